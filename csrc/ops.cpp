// The one place where every bayesvlm_ext op is declared. Implementations live in
// cpu/<family>.cpp (TORCH_LIBRARY_IMPL CPU) and cuda/<family>.cu (TORCH_LIBRARY_IMPL CUDA);
// fake (meta) kernels and autograd formulas are registered from bayesvlm_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(bayesvlm_ext, m) {
  // alpha[i] = phi[i]^T C phi[i]  (SPEC.md section 3).
  // phi: [N, P] float16/bfloat16/float32/float64, any strides.
  // C:   [P, P] float32 (float64 when phi is float64).
  // out: [N] in C's dtype (the accumulation dtype).
  m.def("kron_quadform(Tensor phi, Tensor C) -> Tensor");
}
