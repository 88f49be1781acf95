// CPU kernel for the per-item statistics of one tower (SPEC.md section 3; conventions in ../moments.h).
// Rows are processed in chunks, in parallel: per chunk three BLAS GEMMs (mean = phi W^T,
// T = phi A11, U = mean B_cross, single-threaded inside the parallel region) into chunk-sized
// scratch, then vectorisable row dots. Nothing of size [N, P] besides phi is ever written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../moments.h"

namespace bayesvlm_ext {
namespace {

constexpr int64_t kRowsPerChunk = 128;

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t len) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < len; ++k) sum += a[k] * b[k];
  return sum;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> item_stats_cpu(
    const at::Tensor& phi, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& A_inv, const std::optional<at::Tensor>& B_cross) {
  check_item_stats_inputs(phi, weight, bias, residual, A_inv, B_cross);
  const auto acc = moments_acc_dtype(phi.scalar_type());
  const auto options = phi.options().dtype(acc);
  const int64_t n = phi.size(0), p = phi.size(1), d = weight.size(0);
  at::Tensor mean = at::empty({n, d}, options), alpha = at::empty({n}, options), sq_norm = at::empty({n}, options);
  at::Tensor cross_quad = at::empty({B_cross.has_value() ? n : 0}, options);
  if (n == 0) return {mean, alpha, sq_norm, cross_quad};
  const bool has_bias = bias.has_value();
  const at::Tensor weight_t = weight.t();  // [P, D] view; BLAS reads it transposed
  const at::Tensor a11 = A_inv.narrow(0, 0, p).narrow(1, 0, p);
  const at::Tensor b_cross = B_cross.has_value() ? B_cross->contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(acc, "item_stats_cpu", [&] {
    using acc_t = scalar_t;
    // a12 + a21 (the bias column and row): equals 2 a12 for a symmetric A_inv, and is right for any.
    const at::Tensor a_col =
        has_bias ? (A_inv.select(1, p).narrow(0, 0, p) + A_inv.select(0, p).narrow(0, 0, p)).contiguous() : at::Tensor();
    const acc_t a_const = has_bias ? A_inv[p][p].item<acc_t>() : acc_t(0);
    const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
    at::parallel_for(0, (n + kRowsPerChunk - 1) / kRowsPerChunk, 1, [&](int64_t begin, int64_t end) {
      at::Tensor t_buf = at::empty({kRowsPerChunk, p}, options);
      at::Tensor u_buf = at::empty({b_cross.defined() ? kRowsPerChunk : 0, d}, options);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t i0 = chunk * kRowsPerChunk, rows = std::min(kRowsPerChunk, n - i0);
        const at::Tensor x = phi.narrow(0, i0, rows).to(acc).contiguous();
        at::Tensor mean_block = mean.narrow(0, i0, rows);
        at::mm_out(mean_block, x, weight_t);
        at::Tensor t_block = t_buf.narrow(0, 0, rows);
        at::mm_out(t_block, x, a11);
        const acc_t* x_ptr = x.const_data_ptr<acc_t>();
        const acc_t* t_ptr = t_buf.const_data_ptr<acc_t>();
        acc_t* mean_ptr = mean.mutable_data_ptr<acc_t>() + i0 * d;
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* mean_row = mean_ptr + r * d;
          const acc_t* x_row = x_ptr + r * p;
          acc_t a = dot(t_ptr + r * p, x_row, p);
          if (has_bias) {  // [phi, 1]^T A [phi, 1] = phi^T A11 phi + phi . (a12 + a21) + a22
            a += dot(a_col.const_data_ptr<acc_t>(), x_row, p) + a_const;
            const acc_t* b_ptr = bias_c.const_data_ptr<acc_t>();
            for (int64_t j = 0; j < d; ++j) mean_row[j] += b_ptr[j];
          }
          if (res.defined()) {
            const acc_t* res_row = res.const_data_ptr<acc_t>() + (i0 + r) * d;
            for (int64_t j = 0; j < d; ++j) mean_row[j] += res_row[j];
          }
          alpha.mutable_data_ptr<acc_t>()[i0 + r] = a;
          sq_norm.mutable_data_ptr<acc_t>()[i0 + r] = dot(mean_row, mean_row, d);
        }
        if (b_cross.defined()) {
          // After the bias and residual: U = mean B_cross on the finished rows.
          at::Tensor u_block = u_buf.narrow(0, 0, rows);
          at::mm_out(u_block, mean_block, b_cross);
          const acc_t* u_ptr = u_buf.const_data_ptr<acc_t>();
          for (int64_t r = 0; r < rows; ++r) {
            cross_quad.mutable_data_ptr<acc_t>()[i0 + r] = dot(u_ptr + r * d, mean_ptr + r * d, d);
          }
        }
      }
    });
  });
  return {mean, alpha, sq_norm, cross_quad};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayesvlm_ext, CPU, m) { m.impl("item_stats", &item_stats_cpu); }

}  // namespace bayesvlm_ext
