// Batched quadratic form alpha[i] = phi[i]^T C phi[i] (SPEC.md section 3): shared host checks
// and the plain parameter struct that the per-device kernels read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace bayesvlm_ext {

struct KronQuadformParams {
  const void* phi;        // [n, p] of the input dtype, strides below (in elements)
  int64_t phi_row_stride;
  int64_t phi_col_stride;
  const void* C;          // [p, p] contiguous, accumulation dtype
  void* out;              // [n] accumulation dtype
  int64_t n;
  int64_t p;
};

// The accumulation (and output) dtype: float64 for float64 input, float32 otherwise.
inline c10::ScalarType kron_quadform_acc_dtype(c10::ScalarType phi_dtype) {
  return phi_dtype == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// Validates arguments; TORCH_CHECK_VALUE surfaces as a Python ValueError.
inline void check_kron_quadform_inputs(const at::Tensor& phi, const at::Tensor& C) {
  TORCH_CHECK_VALUE(phi.dim() == 2, "kron_quadform: argument 'phi' must be 2-D [N, P], got shape ",
                    phi.sizes());
  TORCH_CHECK_VALUE(C.dim() == 2 && C.size(0) == C.size(1),
                    "kron_quadform: argument 'C' must be square [P, P], got shape ", C.sizes());
  TORCH_CHECK_VALUE(C.size(0) == phi.size(1), "kron_quadform: argument 'C' must be [", phi.size(1),
                    ", ", phi.size(1), "] to match phi [N, P], got ", C.sizes());
  const auto dt = phi.scalar_type();
  TORCH_CHECK_VALUE(dt == c10::kFloat || dt == c10::kDouble || dt == c10::kHalf || dt == c10::kBFloat16,
                    "kron_quadform: argument 'phi' must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK_VALUE(C.scalar_type() == kron_quadform_acc_dtype(dt), "kron_quadform: argument 'C' must be ",
                    kron_quadform_acc_dtype(dt), " for phi of dtype ", dt, ", got ", C.scalar_type());
  TORCH_CHECK_VALUE(phi.device() == C.device(), "kron_quadform: arguments 'phi' and 'C' must be on one device, got ",
                    phi.device(), " and ", C.device());
}

}  // namespace bayesvlm_ext
