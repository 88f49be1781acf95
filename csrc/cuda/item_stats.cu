// CUDA kernel for the per-item statistics of one tower (SPEC.md section 3; conventions in ../moments.h):
//   mean [N, D] = phi W^T + b (+ r),   alpha [N] = [phi, 1]^T A_inv [phi, 1]  (the 1 only with a bias),
//   sq_norm [N] = ||mean||^2,          cross_quad [N] = mean^T B_cross mean  (only with B_cross).
//
// One pass, no [N, P] intermediate in global memory. A block owns kBlockRows consecutive rows and
// runs three shared-memory tiled SIMT GEMMs of the form  out[r, c] = sum_k lhs[r, k] rhs[c, k]
// (rhs read row-major along k, so every global load of W, A_inv and B_cross is coalesced):
//   1. T = phi A11^T  over column tiles of P; each tile is folded at once into
//      alpha += sum_c phi[r, c] (T[r, c] + a12[c] + a21[c])   (T never leaves registers);
//      A11^T instead of A11 leaves phi^T A11 phi unchanged and keeps the loads coalesced.
//   2. mean = phi W^T + b (+ r)  over column tiles of D; written out, sq_norm accumulated.
//   3. (B_cross only) after a __syncthreads, the block re-reads its own finished mean rows as lhs:
//      U = mean B_cross^T, folded into cross_quad += sum_c mean[r, c] U[r, c].
// phi and mean are streamed through shared memory in K chunks of kChunk, so any P and D work;
// phi is converted to the accumulation dtype (float32; float64 for float64 input) on load.
// Each warp owns kRowsPerWarp rows and each lane kColsPerLane columns (stride 32) of a column
// tile, so the per-row reductions are per-thread partial sums in a fixed order followed by one
// warp shuffle reduction: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../moments.h"

namespace bayesvlm_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockRows = kWarps * kRowsPerWarp;  // 32 rows of phi per block
constexpr int kColsPerLane = 4;
constexpr int kTileCols = 32 * kColsPerLane;  // 128 output columns per tile
constexpr int kChunk = 32;                    // K depth of one shared-memory stage: one k per lane
static_assert(kChunk == 32 && kBlockRows % kWarps == 0 && kTileCols % kWarps == 0, "tile loaders' thread map");

template <typename acc_t>
struct SharedTiles {
  acc_t lhs[kBlockRows][kChunk];  // [rows, k]: the block's phi (or mean) rows, one K chunk
  // [k, cols], padded (row stride 129) so that the stores of one warp, one k per lane, hit distinct banks.
  acc_t rhs[kChunk][kTileCols + 1];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // lane 0 holds the sum
}

// acc[i][j] = sum_{k < depth} lhs(row i of this warp, k) * rhs[col0 + lane + 32 j, k], for one
// column tile. load_lhs(r, k) gives the block-local row r (0 <= r < kBlockRows) at 0 <= k < depth,
// zero for rows past n. rhs: [ncols, ldb] row-major, only k < depth read. Columns >= ncols come
// out as zero. Must be called by every thread of the block (it synchronises).
template <typename acc_t, typename LoadLhs>
__device__ __forceinline__ void tile_gemm(acc_t (&acc)[kRowsPerWarp][kColsPerLane], SharedTiles<acc_t>& tiles,
                                          const LoadLhs& load_lhs, const acc_t* rhs, int64_t ldb, int64_t ncols,
                                          int64_t col0, int64_t depth) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) acc[i][j] = acc_t(0);
  }
  for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
    // Lane = k within the chunk, so each warp reads kChunk consecutive elements of one row
    // (coalesced) per load; warps take rows / columns warp, warp + kWarps, ...
    const int64_t k = k0 + lane;
    const bool k_in = k < depth;
#pragma unroll
    for (int it = 0; it < kBlockRows / kWarps; ++it) {
      const int r = warp + kWarps * it;
      tiles.lhs[r][lane] = k_in ? load_lhs(r, k) : acc_t(0);
    }
#pragma unroll 4  // a full unroll keeps 16 loads in flight and spills
    for (int it = 0; it < kTileCols / kWarps; ++it) {
      const int c = warp + kWarps * it;
      const int64_t col = col0 + c;
      tiles.rhs[lane][c] = (k_in && col < ncols) ? rhs[col * ldb + k] : acc_t(0);  // banks (lane + c) % 32
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      acc_t a[kRowsPerWarp], b[kColsPerLane];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) a[i] = tiles.lhs[warp * kRowsPerWarp + i][kk];  // warp broadcast
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) b[j] = tiles.rhs[kk][lane + 32 * j];  // consecutive banks
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();  // the next chunk (or the next tile_gemm call) overwrites the tiles
  }
}

// kHasBias / kHasCross are compile-time: with D == 0 an empty bias or B_cross may have a null data
// pointer, so the kernel cannot tell "absent" from "empty" by its pointers (and A_inv's width
// depends on the bias).
template <typename scalar_t, typename acc_t, bool kHasBias, bool kHasCross>
__global__ void __launch_bounds__(kThreads, 2) item_stats_kernel(ItemStatsParams params) {
  __shared__ SharedTiles<acc_t> tiles;
  const auto* phi = static_cast<const scalar_t*>(params.phi);  // [n, p] strided
  const auto* weight = static_cast<const acc_t*>(params.weight);  // [d, p]
  const auto* bias = static_cast<const acc_t*>(params.bias);      // [d] (kHasBias)
  const auto* residual = static_cast<const acc_t*>(params.residual);  // [n, d] or nullptr
  const auto* A_inv = static_cast<const acc_t*>(params.A_inv);  // [pa, pa]
  const auto* B_cross = static_cast<const acc_t*>(params.B_cross);  // [d, d] (kHasCross)
  // Written here and re-read in phase 3 by other threads of this block: plain (coherent) loads.
  auto* mean = static_cast<acc_t*>(params.mean);  // [n, d]
  auto* alpha = static_cast<acc_t*>(params.alpha);  // [n]
  auto* sq_norm = static_cast<acc_t*>(params.sq_norm);  // [n]
  auto* cross_quad = static_cast<acc_t*>(params.cross_quad);  // [n] (kHasCross)
  const int64_t n = params.n, p = params.p, d = params.d;
  const int64_t pa = kHasBias ? p + 1 : p;  // A_inv row stride
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;

  auto phi_at = [&](int64_t row, int64_t k) -> acc_t {
    return static_cast<acc_t>(phi[row * params.phi_row_stride + k * params.phi_col_stride]);
  };
  const auto load_phi = [&](int r, int64_t k) -> acc_t { return row0 + r < n ? phi_at(row0 + r, k) : acc_t(0); };

  acc_t acc[kRowsPerWarp][kColsPerLane];
  acc_t alpha_part[kRowsPerWarp], sq_part[kRowsPerWarp], cross_part[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) alpha_part[i] = sq_part[i] = cross_part[i] = acc_t(0);

  // Phase 1: alpha. T[r, c] = sum_k phi[r, k] A[c, k], folded per tile into alpha.
  for (int64_t col0 = 0; col0 < p; col0 += kTileCols) {
    tile_gemm(acc, tiles, load_phi, A_inv, pa, p, col0, p);
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      const int64_t c = col0 + lane + 32 * j;
      if (c >= p) continue;
      // With a bias: [phi, 1]^T A [phi, 1] = phi^T A11 phi + phi . (a12 + a21) + a22, which is
      // 2 phi . a12 for a symmetric A_inv; the sum matches the quadratic form (and the reference) for any A.
      const acc_t linear = kHasBias ? A_inv[c * pa + p] + A_inv[p * pa + c] : acc_t(0);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int64_t row = row0 + warp * kRowsPerWarp + i;
        if (row < n) alpha_part[i] += (acc[i][j] + linear) * phi_at(row, c);
      }
    }
  }

  // Phase 2: mean = phi W^T + b (+ r), written out; sq_norm from the finished values.
  for (int64_t col0 = 0; col0 < d; col0 += kTileCols) {
    tile_gemm(acc, tiles, load_phi, weight, p, d, col0, p);
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      const int64_t c = col0 + lane + 32 * j;
      if (c >= d) continue;
      const acc_t shift = kHasBias ? bias[c] : acc_t(0);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int64_t row = row0 + warp * kRowsPerWarp + i;
        if (row >= n) continue;
        acc_t value = acc[i][j] + shift;
        if (residual != nullptr) value += residual[row * d + c];
        mean[row * d + c] = value;
        sq_part[i] += value * value;
      }
    }
  }

  // Phase 3: cross_quad = sum_c mean[r, c] (sum_k mean[r, k] B[c, k]) on the block's own mean rows.
  if constexpr (kHasCross) {
    __syncthreads();  // every mean row of this block is written and visible to the whole block
    const auto load_mean = [&](int r, int64_t k) -> acc_t {
      return row0 + r < n ? mean[(row0 + r) * d + k] : acc_t(0);
    };
    for (int64_t col0 = 0; col0 < d; col0 += kTileCols) {
      tile_gemm(acc, tiles, load_mean, B_cross, d, d, col0, d);
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        const int64_t c = col0 + lane + 32 * j;
        if (c >= d) continue;
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const int64_t row = row0 + warp * kRowsPerWarp + i;
          if (row < n) cross_part[i] += acc[i][j] * mean[row * d + c];
        }
      }
    }
  }

  // The rows of a warp are reduced over its lanes only: fixed order, no atomics.
  const acc_t a22 = kHasBias ? A_inv[p * pa + p] : acc_t(0);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    const acc_t alpha_sum = warp_sum(alpha_part[i]);
    const acc_t sq_sum = warp_sum(sq_part[i]);
    const acc_t cross_sum = kHasCross ? warp_sum(cross_part[i]) : acc_t(0);
    if (lane == 0 && row < n) {
      alpha[row] = alpha_sum + a22;
      sq_norm[row] = sq_sum;
      if constexpr (kHasCross) cross_quad[row] = cross_sum;
    }
  }
}

template <typename scalar_t>
void launch_item_stats(const ItemStatsParams& params, bool has_bias, bool has_cross, unsigned blocks,
                       cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (has_bias && has_cross) {
    item_stats_kernel<scalar_t, acc_t, true, true><<<blocks, kThreads, 0, stream>>>(params);
  } else if (has_bias) {
    item_stats_kernel<scalar_t, acc_t, true, false><<<blocks, kThreads, 0, stream>>>(params);
  } else if (has_cross) {
    item_stats_kernel<scalar_t, acc_t, false, true><<<blocks, kThreads, 0, stream>>>(params);
  } else {
    item_stats_kernel<scalar_t, acc_t, false, false><<<blocks, kThreads, 0, stream>>>(params);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> item_stats_cuda(
    const at::Tensor& phi,                       // [N, P] any float dtype, any strides
    const at::Tensor& weight,                    // [D, P]
    const std::optional<at::Tensor>& bias,       // [D]
    const std::optional<at::Tensor>& residual,   // [N, D]
    const at::Tensor& A_inv,                     // [P (+1 with bias), P (+1)]
    const std::optional<at::Tensor>& B_cross) {  // [D, D]
  check_item_stats_inputs(phi, weight, bias, residual, A_inv, B_cross);
  TORCH_CHECK_VALUE(phi.is_cuda(), "item_stats: argument 'phi' must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(phi.device());
  const auto options = phi.options().dtype(moments_acc_dtype(phi.scalar_type()));
  const int64_t n = phi.size(0), p = phi.size(1), d = weight.size(0);
  at::Tensor mean = at::empty({n, d}, options);  // [N, D]
  at::Tensor alpha = at::empty({n}, options);    // [N]
  at::Tensor sq_norm = at::empty({n}, options);  // [N]
  at::Tensor cross_quad = at::empty({B_cross.has_value() ? n : 0}, options);  // [N] or [0]
  if (n == 0) return {mean, alpha, sq_norm, cross_quad};

  // Contiguous copies live until the end of this function; the caching allocator keeps their memory
  // for this stream until the kernel has run.
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor residual_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor A_c = A_inv.contiguous();
  const at::Tensor B_c = B_cross.has_value() ? B_cross->contiguous() : at::Tensor();

  ItemStatsParams params{};
  params.phi = phi.const_data_ptr();
  params.phi_row_stride = phi.stride(0);
  params.phi_col_stride = phi.stride(1);
  params.weight = weight_c.const_data_ptr();
  params.bias = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
  params.residual = residual_c.defined() ? residual_c.const_data_ptr() : nullptr;
  params.A_inv = A_c.const_data_ptr();
  params.B_cross = B_c.defined() ? B_c.const_data_ptr() : nullptr;
  params.mean = mean.mutable_data_ptr();
  params.alpha = alpha.mutable_data_ptr();
  params.sq_norm = sq_norm.mutable_data_ptr();
  params.cross_quad = B_cross.has_value() ? cross_quad.mutable_data_ptr() : nullptr;
  params.n = n;
  params.p = p;
  params.d = d;

  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK(blocks <= static_cast<int64_t>(INT32_MAX), "item_stats: batch too large for one launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, phi.scalar_type(), "item_stats_cuda", [&] {
    launch_item_stats<scalar_t>(params, bias.has_value(), B_cross.has_value(), static_cast<unsigned>(blocks),
                                stream);
  });
  return {mean, alpha, sq_norm, cross_quad};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayesvlm_ext, CUDA, m) { m.impl("item_stats", &item_stats_cuda); }

}  // namespace bayesvlm_ext
