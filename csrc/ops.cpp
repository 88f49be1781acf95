// The one place where every bayesvlm_ext op is declared. Implementations live in
// cpu/<family>.cpp (TORCH_LIBRARY_IMPL CPU) and cuda/<family>.cu (TORCH_LIBRARY_IMPL CUDA);
// fake (meta) kernels and autograd formulas are registered from bayesvlm_ext/ops.py.
// Argument conventions of the pairwise ops are documented in moments.h.
#include <torch/library.h>

TORCH_LIBRARY(bayesvlm_ext, m) {
  // alpha[i] = phi[i]^T C phi[i]  (SPEC.md section 3).
  // phi: [N, P] float16/bfloat16/float32/float64, any strides.
  // C:   [P, P] float32 (float64 when phi is float64).
  // out: [N] in C's dtype (the accumulation dtype).
  m.def("kron_quadform(Tensor phi, Tensor C) -> Tensor");

  // Per-item statistics of one tower (SPEC.md section 3), in one pass over phi:
  // mean [N, D] = phi weight^T + bias (+ residual); alpha [N] = [phi, 1]^T A_inv [phi, 1] (the 1 only
  // with a bias); sq_norm [N] = ||mean||^2; cross_quad [N] = mean^T B_cross mean ([0] without B_cross).
  // phi any float dtype and strides; every other tensor in the accumulation dtype.
  m.def(
      "item_stats(Tensor phi, Tensor weight, Tensor? bias, Tensor? residual, Tensor A_inv, Tensor? B_cross) "
      "-> (Tensor mean, Tensor alpha, Tensor sq_norm, Tensor cross_quad)");

  // The same for a tower with damping "exact" (SPEC.md sections 2-3): instead of alpha, the per-item
  // variances along the B eigenbasis, k [N, D] = (z * z) K with z = [phi, 1] Qa [N, p] (the 1 only with a
  // bias). Qa: [p, p] eigenvectors of A; K: [p, D] = 1 / (n a_i e_j + lambda). z is never written out.
  m.def(
      "item_stats_exact(Tensor phi, Tensor weight, Tensor? bias, Tensor? residual, Tensor Qa, Tensor K, "
      "Tensor? B_cross) -> (Tensor mean, Tensor k, Tensor sq_norm, Tensor cross_quad)");

  // Logit mean and variance for every pair of x [N, D] and y [M, D] (SPEC.md section 4): one fused
  // GEMM (two with var features, one more with projection features) and an epilogue. Returns (first
  // [N, M], var [N, M]) in the accumulation dtype; `output` picks first = mean (0), probit logit (1) or
  // sigmoid probit (2). x_proj / y_proj select the "projected" variance (conventions in moments.h).
  m.def(
      "pairwise_moments(Tensor x, Tensor y, Tensor x_stats, Tensor y_stats, Tensor? x_var, Tensor? y_var, "
      "float scale, float bias, float trace_cross, int output, Tensor? x_proj=None, Tensor? y_proj=None) "
      "-> (Tensor, Tensor)");

  // The k best y per x by `score` (SPEC.md section 7), streamed over tiles of y: no [N, M] buffer.
  // Returns (values, indices, mean, var), each [N, k], sorted by score, ties to the lower index.
  m.def(
      "topk_moments(Tensor x, Tensor y, Tensor x_stats, Tensor y_stats, Tensor? x_var, Tensor? y_var, "
      "float scale, float bias, float trace_cross, int k, int score, float kappa, Tensor? x_proj=None, "
      "Tensor? y_proj=None) -> (Tensor values, Tensor indices, Tensor mean, Tensor var)");
}
