// Pairwise logit moments, streaming top-k and per-item statistics (SPEC.md sections 3, 4, 7):
// the plain parameter structs that the per-device kernels read, and the host checks that both
// devices share. Host code checks, kernels compute.
//
// Every pairwise op sees the two batches through the same per-item description:
//   means   x [N, D], y [M, D]   float16/bfloat16/float32/float64, one dtype, any strides
//   stats   [N, 3], [M, 3]       accumulation dtype, contiguous; columns (inv_norm, alpha, quad):
//             inv_norm = 1 / sqrt(E||g||^2),  alpha = the kron-form scalar,
//             quad = mu^T B_other mu, the quadratic form with the other batch's shared matrix
//   var features (optional, both or neither) [N, K], [M, K], accumulation dtype, contiguous:
//             when given, Var[x.y] = x_var[i] . y_var[j] (one more GEMM, "exact" / "diag" forms);
//             otherwise Var[x.y] = ay qx + ax qy + trace_cross ax ay (the Kronecker closed form).
//   projection features (optional, both or neither; the "projected" variance of SPEC.md section 4)
//             [N, D], [M, D] = S u per item (u = mu / ||mu||), accumulation dtype, contiguous; the stats
//             are then [rows, 5], columns 3 and 4 = (inv_mu_norm = 1 / ||mu||, r = u^T S u), and
//             Var[x.y] += cos (cos (r_x ||mu_y||^2 + r_y ||mu_x||^2) - 2 h),
//             h = ||mu_y|| x_proj[i] . y[j] + ||mu_x|| x[i] . y_proj[j] (two more GEMMs),
//             cos = (x[i] . y[j]) inv_mu_norm_x inv_mu_norm_y, clamped at 0 (round-off; NaN stays NaN).
// and produces, per pair (i, j), with c = inv_norm_x[i] * inv_norm_y[j]:
//   mean = scale * (x[i] . y[j]) * c + bias,   var = scale^2 * Var[x.y] * c^2.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cmath>
#include <optional>

namespace bayesvlm_ext {

// What the first output of pairwise_moments holds (the second is always the variance).
enum class MomentsOutput : int64_t {
  kMean = 0,           // mean logit
  kProbitLogit = 1,    // mean / sqrt(1 + pi/8 var)
  kSigmoidProbit = 2,  // sigmoid(mean / sqrt(1 + pi/8 var))
};

// The score top-k ranks by (SPEC.md section 7).
enum class TopkScore : int64_t {
  kMean = 0,         // mean
  kPessimistic = 1,  // mean - kappa sqrt(var)
  kOptimistic = 2,   // mean + kappa sqrt(var)
  kProbit = 3,       // ranked by t = mean / sqrt(1 + pi/8 var); the value returned is sigmoid(t)
};

constexpr double kPiOver8 = 0.39269908169872414;

// Column indices of the [rows, 3] stats tensors.
constexpr int kStatInvNorm = 0;
constexpr int kStatAlpha = 1;
constexpr int kStatQuad = 2;
constexpr int kNumStats = 3;
constexpr int kStatInvMuNorm = 3;  // with projection features only
constexpr int kStatProjQuad = 4;
constexpr int kNumProjectedStats = 5;

struct PairwiseParams {
  const void* x;  // [n, d], input dtype, strides in elements
  int64_t x_row_stride, x_col_stride;
  const void* y;  // [m, d]
  int64_t y_row_stride, y_col_stride;
  const void* x_stats;  // [n, 3] contiguous, accumulation dtype
  const void* y_stats;  // [m, 3]
  const void* x_var;    // [n, k_var] contiguous, accumulation dtype, or nullptr
  const void* y_var;    // [m, k_var] or nullptr
  int64_t n, m, d, k_var;
  double scale, bias, trace_cross;
  // The projected variance only (nullptr otherwise; the CUDA kernels read them, the CPU kernel its tensors):
  const void* x_proj;  // [n, d] S u per item, contiguous, accumulation dtype
  const void* y_proj;  // [m, d]
  const void* x_acc;   // [n, d] the means in the accumulation dtype (x itself for fp32/fp64), strides in elements
  int64_t x_acc_row_stride, x_acc_col_stride;
  const void* y_acc;  // [m, d]
  int64_t y_acc_row_stride, y_acc_col_stride;
};

struct PairwiseMomentsParams {
  PairwiseParams in;
  int64_t output;  // MomentsOutput
  void* out_first;  // [n, m] contiguous, accumulation dtype
  void* out_var;    // [n, m]
};

struct TopkParams {
  PairwiseParams in;
  int64_t k;
  int64_t score;  // TopkScore
  double kappa;
  void* values;   // [n, k] accumulation dtype
  int64_t* indices;  // [n, k]
  void* mean;     // [n, k]
  void* var;      // [n, k]
};

// The accumulation (and output) dtype: float64 for float64 input, float32 otherwise.
inline c10::ScalarType moments_acc_dtype(c10::ScalarType dtype) {
  return dtype == c10::kDouble ? c10::kDouble : c10::kFloat;
}

inline bool is_supported_float(c10::ScalarType dt) {
  return dt == c10::kFloat || dt == c10::kDouble || dt == c10::kHalf || dt == c10::kBFloat16;
}

// Checks the shared pairwise inputs (TORCH_CHECK_VALUE surfaces as a Python ValueError).
inline void check_pairwise_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_stats,
                                  const at::Tensor& y_stats, const std::optional<at::Tensor>& x_var,
                                  const std::optional<at::Tensor>& y_var,
                                  const std::optional<at::Tensor>& x_proj = std::nullopt,
                                  const std::optional<at::Tensor>& y_proj = std::nullopt) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": argument 'x' must be 2-D [N, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(y.dim() == 2, op, ": argument 'y' must be 2-D [M, D], got shape ", y.sizes());
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), op, ": arguments 'x' [N, D] and 'y' [M, D] must share D, got ",
                    x.sizes(), " and ", y.sizes());
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), op,
                    ": argument 'x' must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(y.scalar_type() == x.scalar_type(), op, ": arguments 'x' and 'y' must have one dtype, got ",
                    x.scalar_type(), " and ", y.scalar_type());
  const auto acc = moments_acc_dtype(x.scalar_type());
  TORCH_CHECK_VALUE(x_proj.has_value() == y_proj.has_value(), op,
                    ": arguments 'x_proj' and 'y_proj' must be given together");
  const int64_t columns = x_proj.has_value() ? kNumProjectedStats : kNumStats;
  const char* column_names = x_proj.has_value() ? "(inv_norm, alpha, quad, inv_mu_norm, r) with projection features"
                                                : "(inv_norm, alpha, quad)";
  const auto check_stats = [&](const char* name, const at::Tensor& s, int64_t rows) {
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == rows && s.size(1) == columns, op, ": argument '", name,
                      "' must be [", rows, ", ", columns, "] ", column_names, ", got shape ", s.sizes());
    TORCH_CHECK_VALUE(s.scalar_type() == acc, op, ": argument '", name, "' must be ", acc, ", got ",
                      s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == x.device(), op, ": argument '", name, "' must be on ", x.device(), ", got ",
                      s.device());
  };
  TORCH_CHECK_VALUE(y.device() == x.device(), op, ": arguments 'x' and 'y' must be on one device, got ", x.device(),
                    " and ", y.device());
  check_stats("x_stats", x_stats, x.size(0));
  check_stats("y_stats", y_stats, y.size(0));
  TORCH_CHECK_VALUE(x_var.has_value() == y_var.has_value(), op,
                    ": arguments 'x_var' and 'y_var' must be given together");
  if (x_var.has_value()) {
    const auto check_var = [&](const char* name, const at::Tensor& v, int64_t rows) {
      TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == rows, op, ": argument '", name, "' must be [", rows,
                        ", K], got shape ", v.sizes());
      TORCH_CHECK_VALUE(v.scalar_type() == acc, op, ": argument '", name, "' must be ", acc, ", got ",
                        v.scalar_type());
      TORCH_CHECK_VALUE(v.device() == x.device(), op, ": argument '", name, "' must be on ", x.device(), ", got ",
                        v.device());
    };
    check_var("x_var", *x_var, x.size(0));
    check_var("y_var", *y_var, y.size(0));
    TORCH_CHECK_VALUE(x_var->size(1) == y_var->size(1), op, ": arguments 'x_var' and 'y_var' must share K, got ",
                      x_var->sizes(), " and ", y_var->sizes());
  }
  if (x_proj.has_value()) {
    const auto check_proj = [&](const char* name, const at::Tensor& v, int64_t rows) {
      TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == rows && v.size(1) == x.size(1), op, ": argument '", name,
                        "' must be [", rows, ", ", x.size(1), "] (S u per item), got shape ", v.sizes());
      TORCH_CHECK_VALUE(v.scalar_type() == acc, op, ": argument '", name, "' must be ", acc, ", got ",
                        v.scalar_type());
      TORCH_CHECK_VALUE(v.device() == x.device(), op, ": argument '", name, "' must be on ", x.device(), ", got ",
                        v.device());
    };
    check_proj("x_proj", *x_proj, x.size(0));
    check_proj("y_proj", *y_proj, y.size(0));
  }
}

// Fills the shared part of the parameters. `x_stats`, `y_stats`, `x_var`, `y_var` must already be
// contiguous (the caller keeps the contiguous tensors alive while the kernel runs).
inline PairwiseParams make_pairwise_params(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_stats,
                                           const at::Tensor& y_stats, const at::Tensor* x_var,
                                           const at::Tensor* y_var, double scale, double bias,
                                           double trace_cross) {
  PairwiseParams p{};
  p.x = x.const_data_ptr();
  p.x_row_stride = x.stride(0);
  p.x_col_stride = x.stride(1);
  p.y = y.const_data_ptr();
  p.y_row_stride = y.stride(0);
  p.y_col_stride = y.stride(1);
  p.x_stats = x_stats.const_data_ptr();
  p.y_stats = y_stats.const_data_ptr();
  p.x_var = x_var ? x_var->const_data_ptr() : nullptr;
  p.y_var = y_var ? y_var->const_data_ptr() : nullptr;
  p.n = x.size(0);
  p.m = y.size(0);
  p.d = x.size(1);
  p.k_var = x_var ? x_var->size(1) : 0;
  p.scale = scale;
  p.bias = bias;
  p.trace_cross = trace_cross;
  return p;
}

// The scalars of the pairwise ops are arguments, not data: a NaN or infinite one is a caller's mistake.
inline void check_pairwise_scalars(const char* op, double scale, double bias, double trace_cross) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": argument 'scale' must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(bias), op, ": argument 'bias' must be finite, got ", bias);
  TORCH_CHECK_VALUE(std::isfinite(trace_cross), op, ": argument 'trace_cross' must be finite, got ", trace_cross);
}

inline void check_moments_output(int64_t output) {
  TORCH_CHECK_VALUE(output >= 0 && output <= 2,
                    "pairwise_moments: argument 'output' must be 0 (mean), 1 (probit logit) or 2 "
                    "(sigmoid probit), got ",
                    output);
}

inline void check_topk_args(int64_t k, int64_t m, int64_t score, double kappa) {
  TORCH_CHECK_VALUE(k >= 0 && k <= m, "topk_moments: argument 'k' must be in [0, M] = [0, ", m, "], got ", k);
  TORCH_CHECK_VALUE(score >= 0 && score <= 3,
                    "topk_moments: argument 'score' must be 0 (mean), 1 (pessimistic), 2 (optimistic) or 3 "
                    "(probit), got ",
                    score);
  TORCH_CHECK_VALUE(std::isfinite(kappa), "topk_moments: argument 'kappa' must be finite, got ", kappa);
}

// ---- item_stats: per-item statistics of one tower's embeddings (SPEC.md section 3) ---------------
//   mean[i]       = weight phi[i] + bias (+ residual[i])            [N, D]
//   alpha[i]      = [phi[i], 1]^T A_inv [phi[i], 1]  (the 1 only with a bias)   [N]
//   sq_norm[i]    = ||mean[i]||^2                                    [N]
//   cross_quad[i] = mean[i]^T B_cross mean[i]  ([0] when B_cross is absent)   [N]
struct ItemStatsParams {
  const void* phi;  // [n, p] input dtype, strides in elements
  int64_t phi_row_stride, phi_col_stride;
  const void* weight;    // [d, p] contiguous, accumulation dtype
  const void* bias;      // [d] or nullptr
  const void* residual;  // [n, d] contiguous, accumulation dtype, or nullptr
  const void* A_inv;     // [p + has_bias, p + has_bias] contiguous
  const void* B_cross;   // [d, d] contiguous, or nullptr
  void* mean;            // [n, d] accumulation dtype
  void* alpha;           // [n]
  void* sq_norm;         // [n]
  void* cross_quad;      // [n] or nullptr
  int64_t n, p, d;
};

// item_stats_exact: as ItemStatsParams with, instead of A_inv, the exact-damping per-item variances
//   k[i] = (z[i] * z[i]) K,  z[i] = [phi[i], 1] Qa   (the 1 only with a bias)            [N, D]
struct ItemStatsExactParams {
  const void* phi;  // [n, p] input dtype, strides in elements
  int64_t phi_row_stride, phi_col_stride;
  const void* weight;    // [d, p] contiguous, accumulation dtype
  const void* bias;      // [d] or nullptr
  const void* residual;  // [n, d] contiguous, or nullptr
  const void* Qa;        // [p + has_bias, p + has_bias] contiguous
  const void* K;         // [p + has_bias, d] contiguous
  const void* B_cross;   // [d, d] contiguous, or nullptr
  void* mean;            // [n, d] accumulation dtype
  void* k;               // [n, d]
  void* sq_norm;         // [n]
  void* cross_quad;      // [n] or nullptr
  int64_t n, p, d;
};

inline void check_item_stats_inputs(const at::Tensor& phi, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                    const at::Tensor& A_inv, const std::optional<at::Tensor>& B_cross,
                                    const char* op = "item_stats", const char* a_name = "A_inv") {
  TORCH_CHECK_VALUE(phi.dim() == 2, op, ": argument 'phi' must be 2-D [N, P], got shape ", phi.sizes());
  TORCH_CHECK_VALUE(is_supported_float(phi.scalar_type()), op,
                    ": argument 'phi' must be float16, bfloat16, float32 or float64, got ", phi.scalar_type());
  const auto acc = moments_acc_dtype(phi.scalar_type());
  const int64_t n = phi.size(0), p = phi.size(1);
  const auto check_acc = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.scalar_type() == acc, op, ": argument '", name, "' must be ", acc, " for phi of dtype ",
                      phi.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == phi.device(), op, ": argument '", name, "' must be on ", phi.device(), ", got ",
                      t.device());
  };
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == p, op, ": argument 'weight' must be [D, ", p,
                    "] (P of phi [N, P]), got shape ", weight.sizes());
  check_acc("weight", weight);
  const int64_t d = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d, op, ": argument 'bias' must be [", d,
                      "], got shape ", bias->sizes());
    check_acc("bias", *bias);
  }
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->dim() == 2 && residual->size(0) == n && residual->size(1) == d, op,
                      ": argument 'residual' must be [", n, ", ", d, "], got shape ", residual->sizes());
    check_acc("residual", *residual);
  }
  const int64_t pa = p + (bias.has_value() ? 1 : 0);
  TORCH_CHECK_VALUE(A_inv.dim() == 2 && A_inv.size(0) == pa && A_inv.size(1) == pa, op, ": argument '", a_name,
                    "' must be [", pa, ", ", pa, "] (P", bias.has_value() ? " + 1 for the bias column" : "",
                    "), got shape ", A_inv.sizes());
  check_acc(a_name, A_inv);
  if (B_cross.has_value()) {
    TORCH_CHECK_VALUE(B_cross->dim() == 2 && B_cross->size(0) == d && B_cross->size(1) == d, op,
                      ": argument 'B_cross' must be [", d, ", ", d, "], got shape ", B_cross->sizes());
    check_acc("B_cross", *B_cross);
  }
}

inline void check_item_stats_exact_inputs(const at::Tensor& phi, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& residual, const at::Tensor& Qa,
                                          const at::Tensor& K, const std::optional<at::Tensor>& B_cross) {
  constexpr const char* op = "item_stats_exact";
  TORCH_CHECK_VALUE(phi.dim() == 2, op, ": argument 'phi' must be 2-D [N, P], got shape ", phi.sizes());
  TORCH_CHECK_VALUE(is_supported_float(phi.scalar_type()), op,
                    ": argument 'phi' must be float16, bfloat16, float32 or float64, got ", phi.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": argument 'weight' must be 2-D [D, P], got shape ", weight.sizes());
  const int64_t p = phi.size(1), d = weight.size(0), pa = p + (bias.has_value() ? 1 : 0);
  TORCH_CHECK_VALUE(Qa.dim() == 2 && Qa.size(0) == pa && Qa.size(1) == pa, op, ": argument 'Qa' must be [", pa,
                    ", ", pa, "], got shape ", Qa.sizes());
  TORCH_CHECK_VALUE(K.dim() == 2 && K.size(0) == pa && K.size(1) == d, op, ": argument 'K' must be [", pa, ", ",
                    d, "], got shape ", K.sizes());
  TORCH_CHECK_VALUE(K.scalar_type() == Qa.scalar_type() && K.device() == phi.device(), op,
                    ": argument 'K' must match Qa's dtype and phi's device");
  // The rest is item_stats' contract, with Qa in the place of A_inv.
  check_item_stats_inputs(phi, weight, bias, residual, Qa, B_cross, op, "Qa");
}

}  // namespace bayesvlm_ext
