// CPU kernel for alpha[i] = phi[i]^T C phi[i] (SPEC.md section 3).
// Rows are processed in chunks: one BLAS GEMM T = phi_chunk C (all cores), then a vectorised
// row-wise dot(T[i], phi[i]) over the chunk. Extra memory is O(chunk * P), never O(N * P).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../kron_quadform.h"

namespace bayesvlm_ext {
namespace {

constexpr int64_t kRowsPerChunk = 1024;

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t len) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec acc(acc_t(0));
  int64_t k = 0;
  for (; k + Vec::size() <= len; k += Vec::size()) {
    acc = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), acc);
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; k < len; ++k) sum += a[k] * b[k];
  return sum;
}

template <typename acc_t>
void rowwise_dot(const at::Tensor& t, const at::Tensor& x, acc_t* out) {
  // t, x: [rows, P] contiguous accumulation dtype; out: [rows].
  const int64_t rows = t.size(0), p = t.size(1);
  const acc_t* t_ptr = t.const_data_ptr<acc_t>();
  const acc_t* x_ptr = x.const_data_ptr<acc_t>();
  at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = dot(t_ptr + i * p, x_ptr + i * p, p);
  });
}

at::Tensor kron_quadform_cpu(const at::Tensor& phi, const at::Tensor& C) {
  check_kron_quadform_inputs(phi, C);
  const auto acc_dtype = kron_quadform_acc_dtype(phi.scalar_type());
  const int64_t n = phi.size(0);
  at::Tensor out = at::empty({n}, phi.options().dtype(acc_dtype));
  if (n == 0) return out;
  const at::Tensor c = C.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "kron_quadform_cpu", [&] {
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < n; r0 += kRowsPerChunk) {
      const int64_t rows = std::min(kRowsPerChunk, n - r0);
      const at::Tensor x = phi.narrow(0, r0, rows).to(acc_dtype).contiguous();
      const at::Tensor t = at::mm(x, c);
      rowwise_dot<scalar_t>(t, x, out_ptr + r0);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bayesvlm_ext, CPU, m) { m.impl("kron_quadform", &kron_quadform_cpu); }

}  // namespace bayesvlm_ext
