// CPU kernels for the per-item statistics of one tower (SPEC.md section 3; conventions in ../moments.h).
// Rows are processed in chunks, in parallel: per chunk a few BLAS GEMMs (single-threaded inside the
// parallel region) into chunk-sized scratch, then vectorisable row dots. Nothing of size [N, P]
// besides phi is ever written.
//   item_stats:        mean = phi W^T + b (+ r), alpha = [phi, 1]^T A_inv [phi, 1] (T = phi A11 scratch)
//   item_stats_exact:  mean as above, k = (z * z) K with z = [phi, 1] Qa (z scratch)
// and both: sq_norm = ||mean||^2, cross_quad = mean^T B_cross mean (U = mean B_cross scratch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../moments.h"
#include "vectorise.h"

namespace bayesvlm_ext {
namespace {

constexpr int64_t kRowsPerChunk = 128;

template <typename acc_t>
BAYESVLM_EXT_VECTORISE acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t len) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < len; ++k) sum += a[k] * b[k];
  return sum;
}

// The shared part of both ops: mean, sq_norm and cross_quad per chunk of rows, with
// `covariance(x, i0, rows)` called on each chunk's features (acc dtype, contiguous [rows, P])
// to fill the op's own per-item covariance output.
template <typename acc_t, typename Covariance>
void for_each_chunk(const at::Tensor& phi, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& B_cross,
                    at::Tensor& mean, at::Tensor& sq_norm, at::Tensor& cross_quad, const Covariance& covariance) {
  const int64_t n = phi.size(0), d = weight.size(0);
  const auto options = mean.options();
  const at::Tensor weight_t = weight.t();  // [P, D] view; BLAS reads it transposed
  const at::Tensor b_cross = B_cross.has_value() ? B_cross->contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::parallel_for(0, (n + kRowsPerChunk - 1) / kRowsPerChunk, 1, [&](int64_t begin, int64_t end) {
    at::Tensor u_buf = at::empty({b_cross.defined() ? kRowsPerChunk : 0, d}, options);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t i0 = chunk * kRowsPerChunk, rows = std::min(kRowsPerChunk, n - i0);
      const at::Tensor x = phi.narrow(0, i0, rows).to(mean.scalar_type()).contiguous();
      at::Tensor mean_block = mean.narrow(0, i0, rows);
      at::mm_out(mean_block, x, weight_t);
      covariance(x, i0, rows);
      acc_t* mean_ptr = mean.mutable_data_ptr<acc_t>() + i0 * d;
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* mean_row = mean_ptr + r * d;
        if (bias_c.defined()) {
          const acc_t* b_ptr = bias_c.const_data_ptr<acc_t>();
          for (int64_t j = 0; j < d; ++j) mean_row[j] += b_ptr[j];
        }
        if (res.defined()) {
          const acc_t* res_row = res.const_data_ptr<acc_t>() + (i0 + r) * d;
          for (int64_t j = 0; j < d; ++j) mean_row[j] += res_row[j];
        }
        sq_norm.mutable_data_ptr<acc_t>()[i0 + r] = dot(mean_row, mean_row, d);
      }
      if (b_cross.defined()) {  // on the finished rows, bias and residual included
        at::Tensor u_block = u_buf.narrow(0, 0, rows);
        at::mm_out(u_block, mean_block, b_cross);
        const acc_t* u_ptr = u_buf.const_data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) {
          cross_quad.mutable_data_ptr<acc_t>()[i0 + r] = dot(u_ptr + r * d, mean_ptr + r * d, d);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_shared_outputs(const at::Tensor& phi, int64_t d,
                                                                       bool has_cross) {
  const auto options = phi.options().dtype(moments_acc_dtype(phi.scalar_type()));
  const int64_t n = phi.size(0);
  return {at::empty({n, d}, options), at::empty({n}, options), at::empty({has_cross ? n : 0}, options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> item_stats_cpu(
    const at::Tensor& phi, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& A_inv, const std::optional<at::Tensor>& B_cross) {
  check_item_stats_inputs(phi, weight, bias, residual, A_inv, B_cross);
  auto [mean, sq_norm, cross_quad] = allocate_shared_outputs(phi, weight.size(0), B_cross.has_value());
  const int64_t n = phi.size(0), p = phi.size(1);
  at::Tensor alpha = at::empty({n}, mean.options());
  if (n == 0) return {mean, alpha, sq_norm, cross_quad};
  const bool has_bias = bias.has_value();
  const at::Tensor a11 = A_inv.narrow(0, 0, p).narrow(1, 0, p);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "item_stats_cpu", [&] {
    using acc_t = scalar_t;
    // a12 + a21 (the bias column and row): equals 2 a12 for a symmetric A_inv, and is right for any.
    const at::Tensor a_col =
        has_bias ? (A_inv.select(1, p).narrow(0, 0, p) + A_inv.select(0, p).narrow(0, 0, p)).contiguous()
                 : at::Tensor();
    const acc_t a_const = has_bias ? A_inv[p][p].item<acc_t>() : acc_t(0);
    for_each_chunk<acc_t>(phi, weight, bias, residual, B_cross, mean, sq_norm, cross_quad,
                          [&](const at::Tensor& x, int64_t i0, int64_t rows) {
                            const at::Tensor t = at::mm(x, a11);  // [rows, P] chunk scratch
                            const acc_t* x_ptr = x.const_data_ptr<acc_t>();
                            const acc_t* t_ptr = t.const_data_ptr<acc_t>();
                            for (int64_t r = 0; r < rows; ++r) {
                              // [phi, 1]^T A [phi, 1] = phi^T A11 phi + phi . (a12 + a21) + a22
                              acc_t a = dot(t_ptr + r * p, x_ptr + r * p, p);
                              if (has_bias) a += dot(a_col.const_data_ptr<acc_t>(), x_ptr + r * p, p) + a_const;
                              alpha.mutable_data_ptr<acc_t>()[i0 + r] = a;
                            }
                          });
  });
  return {mean, alpha, sq_norm, cross_quad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> item_stats_exact_cpu(
    const at::Tensor& phi, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& Qa, const at::Tensor& K,
    const std::optional<at::Tensor>& B_cross) {
  check_item_stats_exact_inputs(phi, weight, bias, residual, Qa, K, B_cross);
  auto [mean, sq_norm, cross_quad] = allocate_shared_outputs(phi, weight.size(0), B_cross.has_value());
  const int64_t n = phi.size(0), p = phi.size(1);
  at::Tensor k_out = at::empty({n, weight.size(0)}, mean.options());
  if (n == 0) return {mean, k_out, sq_norm, cross_quad};
  const at::Tensor qa_features = Qa.narrow(0, 0, p);  // [P, p] view (rows of the features)
  const at::Tensor qa_const = bias.has_value() ? Qa.select(0, p) : at::Tensor();  // [p] row of the constant 1
  const at::Tensor k_matrix = K.contiguous();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "item_stats_exact_cpu", [&] {
    using acc_t = scalar_t;
    for_each_chunk<acc_t>(phi, weight, bias, residual, B_cross, mean, sq_norm, cross_quad,
                          [&](const at::Tensor& x, int64_t i0, int64_t rows) {
                            at::Tensor z = at::mm(x, qa_features);  // [rows, p] chunk scratch
                            if (qa_const.defined()) z.add_(qa_const);
                            z.mul_(z);
                            at::Tensor k_block = k_out.narrow(0, i0, rows);
                            at::mm_out(k_block, z, k_matrix);
                          });
  });
  return {mean, k_out, sq_norm, cross_quad};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayesvlm_ext, CPU, m) {
  m.impl("item_stats", &item_stats_cpu);
  m.impl("item_stats_exact", &item_stats_exact_cpu);
}

}  // namespace bayesvlm_ext
