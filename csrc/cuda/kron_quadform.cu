// CUDA kernel for alpha[i] = phi[i]^T C phi[i] (SPEC.md section 3).
// One block handles kRows rows. Each thread owns columns k (strided by blockDim.x) and forms
// t[r] = sum_j C[j, k] phi[r, j] with coalesced reads of C's rows and broadcast reads of phi,
// then alpha[r] = sum_k t[r] phi[r, k] by a block reduction. Accumulation in float32 (float64
// for float64 input). The tensor-core fused version is the kernels issue's work.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kron_quadform.h"

namespace bayesvlm_ext {
namespace {

constexpr int kRows = 8;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) kron_quadform_kernel(KronQuadformParams params) {
  const auto* phi = static_cast<const scalar_t*>(params.phi);
  const auto* C = static_cast<const acc_t*>(params.C);
  auto* out = static_cast<acc_t*>(params.out);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), params.n - row0));
  const int64_t p = params.p;

  auto phi_at = [&](int r, int64_t j) -> acc_t {
    return static_cast<acc_t>(phi[(row0 + r) * params.phi_row_stride + j * params.phi_col_stride]);
  };

  acc_t partial[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) partial[r] = acc_t(0);

  for (int64_t k = threadIdx.x; k < p; k += blockDim.x) {
    acc_t t[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) t[r] = acc_t(0);
    for (int64_t j = 0; j < p; ++j) {
      const acc_t c = C[j * p + k];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) t[r] += c * phi_at(r, j);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) partial[r] += t[r] * phi_at(r, k);
    }
  }

  __shared__ acc_t warp_sums[kRows][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    acc_t v = partial[r];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[r][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    acc_t sum = acc_t(0);
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[threadIdx.x][w];
    out[row0 + threadIdx.x] = sum;
  }
}

at::Tensor kron_quadform_cuda(const at::Tensor& phi, const at::Tensor& C) {
  check_kron_quadform_inputs(phi, C);
  TORCH_CHECK_VALUE(phi.is_cuda(), "kron_quadform: argument 'phi' must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(phi.device());
  const auto acc_dtype = kron_quadform_acc_dtype(phi.scalar_type());
  const int64_t n = phi.size(0);
  at::Tensor out = at::empty({n}, phi.options().dtype(acc_dtype));
  if (n == 0) return out;
  const at::Tensor c = C.contiguous();
  KronQuadformParams params{phi.const_data_ptr(), phi.stride(0), phi.stride(1), c.const_data_ptr(),
                            out.mutable_data_ptr(), n, phi.size(1)};
  const int64_t blocks = (n + kRows - 1) / kRows;
  TORCH_CHECK(blocks <= static_cast<int64_t>(INT32_MAX), "kron_quadform: batch too large for one launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, phi.scalar_type(), "kron_quadform_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kron_quadform_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bayesvlm_ext, CUDA, m) { m.impl("kron_quadform", &kron_quadform_cuda); }

}  // namespace bayesvlm_ext
