// CUDA kernels for the per-item statistics of one tower (SPEC.md sections 2-3; conventions in ../moments.h):
//   item_stats:        mean [N, D] = phi W^T + b (+ r),   alpha [N] = [phi, 1]^T A_inv [phi, 1],
//   item_stats_exact:  the same mean, and instead of alpha  k [N, D] = (z * z) K,  z = [phi, 1] Qa,
//   both:              sq_norm [N] = ||mean||^2,   cross_quad [N] = mean^T B_cross mean  (only with B_cross).
// (The appended 1 only with a bias; p = P + 1 then, else P.)
//
// One pass, no [N, P] or [N, p] intermediate in global memory. A block owns kBlockRows consecutive
// rows and runs shared-memory tiled SIMT GEMMs  out[r, c] = sum_k lhs[r, k] rhs(c, k)  over column
// tiles of kTileCols, with rhs either [cols, k] or [k, cols] row-major; the tile loader matches the
// layout so that every global load of W, A_inv, Qa, K and B_cross is coalesced:
//   alpha (item_stats): T = phi A11^T over column tiles of P; each tile is folded at once into
//      alpha += sum_c phi[r, c] (T[r, c] + a12[c] + a21[c])   (T never leaves registers);
//      A11^T instead of A11 leaves phi^T A11 phi unchanged and keeps the loads coalesced.
//   k (item_stats_exact): for each column tile of z = [phi, 1] Qa (Qa read [k, cols]), the tile is
//      squared in registers and, per column tile of D, multiplied by the matching K rows: each
//      thread's z values are exactly its share of the lhs chunk tile, so z goes registers -> shared
//      -> FMAs and is never stored. The partial k of this z tile is added into the block's own rows
//      of k in global memory (the first z tile writes): the same thread owns an element on every
//      z tile, so no atomics and a fixed summation order.
//   mean = phi W^T + b (+ r)  over column tiles of D; written out, sq_norm accumulated.
//   cross_quad (B_cross only): after a __syncthreads, the block re-reads its own finished mean rows
//      as lhs: U = mean B_cross^T, folded into cross_quad += sum_c mean[r, c] U[r, c].
// lhs (phi or mean) is streamed through shared memory in K chunks of kChunk, so any P and D work;
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
#include <type_traits>

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
// Loads one kChunk x kTileCols rhs stage: tiles.rhs[kk][c] = rhs(col0 + c, k0 + kk), zero outside
// cols < ncols, k < depth. kKByCols = false: rhs is [ncols, ldb] (element (col, k) at col * ldb + k),
// a warp reads kChunk consecutive k of one column; true: rhs is [depth, ldb] (element at k * ldb + col),
// a warp reads 32 consecutive columns of one k.
template <bool kKByCols, typename acc_t>
__device__ __forceinline__ void stage_rhs(SharedTiles<acc_t>& tiles, const acc_t* rhs, int64_t ldb, int64_t ncols,
                                          int64_t col0, int64_t k0, int64_t depth) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if constexpr (!kKByCols) {
    const int64_t k = k0 + lane;
    const bool k_in = k < depth;
#pragma unroll 4  // a full unroll keeps 16 loads in flight and spills
    for (int it = 0; it < kTileCols / kWarps; ++it) {
      const int c = warp + kWarps * it;
      const int64_t col = col0 + c;
      tiles.rhs[lane][c] = (k_in && col < ncols) ? rhs[col * ldb + k] : acc_t(0);  // banks (lane + c) % 32
    }
  } else {
#pragma unroll 2  // 8 loads in flight; a full unroll spills in the float64 exact kernel
    for (int it = 0; it < kChunk / kWarps; ++it) {
      const int kk = warp + kWarps * it;
      const int64_t k = k0 + kk;
      const bool k_in = k < depth;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        const int c = lane + 32 * j;
        const int64_t col = col0 + c;
        tiles.rhs[kk][c] = (k_in && col < ncols) ? rhs[k * ldb + col] : acc_t(0);  // consecutive banks
      }
    }
  }
}

// acc[i][j] += sum_{kk < kChunk} tiles.lhs[warp rows i][kk] * tiles.rhs[kk][lane + 32 j].
template <typename acc_t>
__device__ __forceinline__ void fma_chunk(acc_t (&acc)[kRowsPerWarp][kColsPerLane], const SharedTiles<acc_t>& tiles) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
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
}

// acc[i][j] = sum_{k < depth} lhs(row i of this warp, k) * rhs(col0 + lane + 32 j, k), for one
// column tile. load_lhs(r, k) gives the block-local row r (0 <= r < kBlockRows) at 0 <= k < depth,
// zero for rows past n. rhs: see stage_rhs, only k < depth read. Columns >= ncols come out as
// zero. Must be called by every thread of the block (it synchronises).
template <bool kKByCols, typename acc_t, typename LoadLhs>
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
    // (coalesced) per load; warps take rows warp, warp + kWarps, ...
    const int64_t k = k0 + lane;
    const bool k_in = k < depth;
#pragma unroll
    for (int it = 0; it < kBlockRows / kWarps; ++it) {
      const int r = warp + kWarps * it;
      tiles.lhs[r][lane] = k_in ? load_lhs(r, k) : acc_t(0);
    }
    stage_rhs<kKByCols>(tiles, rhs, ldb, ncols, col0, k0, depth);
    __syncthreads();
    fma_chunk(acc, tiles);
    __syncthreads();  // the next chunk (or the next tile_gemm call) overwrites the tiles
  }
}

// The kernel-side view of what both ops share: mean, sq_norm and cross_quad.
template <typename acc_t>
struct MeanView {
  const acc_t* weight;    // [d, p]
  const acc_t* bias;      // [d] (kHasBias)
  const acc_t* residual;  // [n, d] or nullptr
  const acc_t* B_cross;   // [d, d] (kHasCross)
  // Written in the mean phase and re-read in the cross phase by other threads of the block: plain
  // (coherent) loads.
  acc_t* mean;        // [n, d]
  acc_t* sq_norm;     // [n]
  acc_t* cross_quad;  // [n] (kHasCross)
  int64_t n, p, d;
};

template <typename acc_t, typename Params>
__device__ __forceinline__ MeanView<acc_t> mean_view(const Params& params) {
  return {static_cast<const acc_t*>(params.weight),  static_cast<const acc_t*>(params.bias),
          static_cast<const acc_t*>(params.residual), static_cast<const acc_t*>(params.B_cross),
          static_cast<acc_t*>(params.mean),           static_cast<acc_t*>(params.sq_norm),
          static_cast<acc_t*>(params.cross_quad),     params.n,
          params.p,                                   params.d};
}

// mean = phi W^T + b (+ r) written out, then (kHasCross) cross_quad on the block's own mean rows,
// then sq_norm and cross_quad. Every thread of the block calls it (it synchronises).
template <typename acc_t, bool kHasBias, bool kHasCross, typename LoadLhs>
__device__ __forceinline__ void mean_stats(SharedTiles<acc_t>& tiles, const LoadLhs& load_phi, const MeanView<acc_t>& v,
                                           int64_t row0) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t n = v.n, d = v.d;
  acc_t acc[kRowsPerWarp][kColsPerLane];
  acc_t sq_part[kRowsPerWarp], cross_part[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) sq_part[i] = cross_part[i] = acc_t(0);

  // mean = phi W^T + b (+ r), written out; sq_norm from the finished values.
  for (int64_t col0 = 0; col0 < d; col0 += kTileCols) {
    tile_gemm<false>(acc, tiles, load_phi, v.weight, v.p, d, col0, v.p);
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      const int64_t c = col0 + lane + 32 * j;
      if (c >= d) continue;
      const acc_t shift = kHasBias ? v.bias[c] : acc_t(0);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int64_t row = row0 + warp * kRowsPerWarp + i;
        if (row >= n) continue;
        acc_t value = acc[i][j] + shift;
        if (v.residual != nullptr) value += v.residual[row * d + c];
        v.mean[row * d + c] = value;
        sq_part[i] += value * value;
      }
    }
  }

  // cross_quad = sum_c mean[r, c] (sum_k mean[r, k] B[c, k]) on the block's own mean rows.
  if constexpr (kHasCross) {
    __syncthreads();  // every mean row of this block is written and visible to the whole block
    const auto load_mean = [&](int r, int64_t k) -> acc_t {
      return row0 + r < n ? v.mean[(row0 + r) * d + k] : acc_t(0);
    };
    for (int64_t col0 = 0; col0 < d; col0 += kTileCols) {
      tile_gemm<false>(acc, tiles, load_mean, v.B_cross, d, d, col0, d);
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        const int64_t c = col0 + lane + 32 * j;
        if (c >= d) continue;
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const int64_t row = row0 + warp * kRowsPerWarp + i;
          if (row < n) cross_part[i] += acc[i][j] * v.mean[row * d + c];
        }
      }
    }
  }

  // The rows of a warp are reduced over its lanes only: fixed order, no atomics.
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    const acc_t sq_sum = warp_sum(sq_part[i]);
    const acc_t cross_sum = kHasCross ? warp_sum(cross_part[i]) : acc_t(0);
    if (lane == 0 && row < n) {
      v.sq_norm[row] = sq_sum;
      if constexpr (kHasCross) v.cross_quad[row] = cross_sum;
    }
  }
}

// kHasBias / kHasCross are compile-time: with D == 0 an empty bias or B_cross may have a null data
// pointer, so the kernel cannot tell "absent" from "empty" by its pointers (and A_inv's width
// depends on the bias).
template <typename scalar_t, typename acc_t, bool kHasBias, bool kHasCross>
__global__ void __launch_bounds__(kThreads, 2) item_stats_kernel(ItemStatsParams params) {
  __shared__ SharedTiles<acc_t> tiles;
  const auto* phi = static_cast<const scalar_t*>(params.phi);  // [n, p] strided
  const auto* A_inv = static_cast<const acc_t*>(params.A_inv);  // [pa, pa]
  auto* alpha = static_cast<acc_t*>(params.alpha);  // [n]
  const int64_t n = params.n, p = params.p;
  const int64_t pa = kHasBias ? p + 1 : p;  // A_inv row stride
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;

  auto phi_at = [&](int64_t row, int64_t k) -> acc_t {
    return static_cast<acc_t>(phi[row * params.phi_row_stride + k * params.phi_col_stride]);
  };
  const auto load_phi = [&](int r, int64_t k) -> acc_t { return row0 + r < n ? phi_at(row0 + r, k) : acc_t(0); };

  // alpha: T[r, c] = sum_k phi[r, k] A[c, k], folded per tile into alpha.
  acc_t acc[kRowsPerWarp][kColsPerLane];
  acc_t alpha_part[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) alpha_part[i] = acc_t(0);
  for (int64_t col0 = 0; col0 < p; col0 += kTileCols) {
    tile_gemm<false>(acc, tiles, load_phi, A_inv, pa, p, col0, p);
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

  mean_stats<acc_t, kHasBias, kHasCross>(tiles, load_phi, mean_view<acc_t>(params), row0);

  const acc_t a22 = kHasBias ? A_inv[p * pa + p] : acc_t(0);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    const acc_t alpha_sum = warp_sum(alpha_part[i]);
    if (lane == 0 && row < n) alpha[row] = alpha_sum + a22;
  }
}

template <typename scalar_t, typename acc_t, bool kHasBias, bool kHasCross>
__global__ void __launch_bounds__(kThreads, 2) item_stats_exact_kernel(ItemStatsExactParams params) {
  __shared__ SharedTiles<acc_t> tiles;
  const auto* phi = static_cast<const scalar_t*>(params.phi);  // [n, p] strided
  const auto* Qa = static_cast<const acc_t*>(params.Qa);       // [pa, pa]
  const auto* K = static_cast<const acc_t*>(params.K);         // [pa, d]
  auto* k_out = static_cast<acc_t*>(params.k);                 // [n, d]; rows of this block only
  const int64_t n = params.n, p = params.p, d = params.d;
  const int64_t pa = kHasBias ? p + 1 : p;  // length of z = [phi, 1] Qa
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;

  const auto load_phi = [&](int r, int64_t k) -> acc_t {
    return row0 + r < n ? static_cast<acc_t>(phi[(row0 + r) * params.phi_row_stride + k * params.phi_col_stride])
                        : acc_t(0);
  };
  // [phi, 1] (k < pa): the constant bias feature at k == p.
  const auto load_phi1 = [&](int r, int64_t k) -> acc_t {
    return (kHasBias && k == p) ? (row0 + r < n ? acc_t(1) : acc_t(0)) : load_phi(r, k);
  };

  // k = sum over column tiles c0 of z: (z[:, c0 tile] ^ 2) K[c0 tile, :]. The branches are block-uniform.
  if (d > 0) {
    acc_t zsq[kRowsPerWarp][kColsPerLane];  // z[row i of this warp, c0 + lane + 32 j]^2; 0 past n, pa
    acc_t acc[kRowsPerWarp][kColsPerLane];
    for (int64_t c0 = 0; c0 < pa; c0 += kTileCols) {
      tile_gemm<true>(zsq, tiles, load_phi1, Qa, pa, pa, c0, pa);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) zsq[i][j] *= zsq[i][j];
      }
      for (int64_t e0 = 0; e0 < d; e0 += kTileCols) {
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
          for (int j = 0; j < kColsPerLane; ++j) acc[i][j] = acc_t(0);
        }
        // Chunk j of this z tile covers c0 + 32 j + [0, 32): this thread holds its rows
        // warp * kRowsPerWarp + i at c = lane, i.e. exactly its share of the lhs stage.
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) {
          if (c0 + 32 * j >= pa) break;
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) tiles.lhs[warp * kRowsPerWarp + i][lane] = zsq[i][j];
          stage_rhs<true>(tiles, K, d, d, e0, c0 + 32 * j, pa);
          __syncthreads();
          fma_chunk(acc, tiles);
          __syncthreads();  // the next stage overwrites the tiles
        }
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) {
          const int64_t e = e0 + lane + 32 * j;
          if (e >= d) continue;
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) {
            const int64_t row = row0 + warp * kRowsPerWarp + i;
            if (row >= n) continue;
            acc_t* out = k_out + row * d + e;  // only this thread touches it, on every z tile
            *out = c0 == 0 ? acc[i][j] : *out + acc[i][j];
          }
        }
      }
    }
    if (pa == 0) {  // P == 0 without a bias: z is empty, k = 0
      for (int64_t idx = threadIdx.x; idx < kBlockRows * d; idx += kThreads) {
        const int64_t row = row0 + idx / d;
        if (row < n) k_out[row * d + idx % d] = acc_t(0);
      }
    }
  }

  mean_stats<acc_t, kHasBias, kHasCross>(tiles, load_phi, mean_view<acc_t>(params), row0);
}

// Calls f(std::bool_constant<has_bias>, std::bool_constant<has_cross>).
template <typename F>
void with_flags(bool has_bias, bool has_cross, const F& f) {
  if (has_bias && has_cross) {
    f(std::true_type{}, std::true_type{});
  } else if (has_bias) {
    f(std::true_type{}, std::false_type{});
  } else if (has_cross) {
    f(std::false_type{}, std::true_type{});
  } else {
    f(std::false_type{}, std::false_type{});
  }
}

unsigned num_blocks(int64_t n, const char* op) {
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK(blocks <= static_cast<int64_t>(INT32_MAX), op, ": batch too large for one launch");
  return static_cast<unsigned>(blocks);
}

// The fields both params structs share: phi, the mean's inputs and the shared outputs.
template <typename Params>
void fill_mean_params(Params& params, const at::Tensor& phi, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& residual, const at::Tensor& B_cross, at::Tensor& mean, at::Tensor& sq_norm,
                      at::Tensor& cross_quad, int64_t d) {
  params.phi = phi.const_data_ptr();
  params.phi_row_stride = phi.stride(0);
  params.phi_col_stride = phi.stride(1);
  params.weight = weight.const_data_ptr();
  params.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  params.residual = residual.defined() ? residual.const_data_ptr() : nullptr;
  params.B_cross = B_cross.defined() ? B_cross.const_data_ptr() : nullptr;
  params.mean = mean.mutable_data_ptr();
  params.sq_norm = sq_norm.mutable_data_ptr();
  params.cross_quad = B_cross.defined() ? cross_quad.mutable_data_ptr() : nullptr;
  params.n = phi.size(0);
  params.p = phi.size(1);
  params.d = d;
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
  const int64_t n = phi.size(0), d = weight.size(0);
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
  fill_mean_params(params, phi, weight_c, bias_c, residual_c, B_c, mean, sq_norm, cross_quad, d);
  params.A_inv = A_c.const_data_ptr();
  params.alpha = alpha.mutable_data_ptr();

  const unsigned blocks = num_blocks(n, "item_stats");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, phi.scalar_type(), "item_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flags(bias.has_value(), B_cross.has_value(), [&](auto has_bias, auto has_cross) {
      item_stats_kernel<scalar_t, acc_t, decltype(has_bias)::value, decltype(has_cross)::value>
          <<<blocks, kThreads, 0, stream>>>(params);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, alpha, sq_norm, cross_quad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> item_stats_exact_cuda(
    const at::Tensor& phi,                       // [N, P] any float dtype, any strides
    const at::Tensor& weight,                    // [D, P]
    const std::optional<at::Tensor>& bias,       // [D]
    const std::optional<at::Tensor>& residual,   // [N, D]
    const at::Tensor& Qa,                        // [p, p], p = P (+1 with bias)
    const at::Tensor& K,                         // [p, D]
    const std::optional<at::Tensor>& B_cross) {  // [D, D]
  check_item_stats_exact_inputs(phi, weight, bias, residual, Qa, K, B_cross);
  TORCH_CHECK_VALUE(phi.is_cuda(), "item_stats_exact: argument 'phi' must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(phi.device());
  const auto options = phi.options().dtype(moments_acc_dtype(phi.scalar_type()));
  const int64_t n = phi.size(0), d = weight.size(0);
  at::Tensor mean = at::empty({n, d}, options);  // [N, D]
  at::Tensor k = at::empty({n, d}, options);     // [N, D]
  at::Tensor sq_norm = at::empty({n}, options);  // [N]
  at::Tensor cross_quad = at::empty({B_cross.has_value() ? n : 0}, options);  // [N] or [0]
  if (n == 0) return {mean, k, sq_norm, cross_quad};

  // Contiguous copies live until the end of this function (see item_stats_cuda).
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor residual_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor Qa_c = Qa.contiguous();
  const at::Tensor K_c = K.contiguous();
  const at::Tensor B_c = B_cross.has_value() ? B_cross->contiguous() : at::Tensor();

  ItemStatsExactParams params{};
  fill_mean_params(params, phi, weight_c, bias_c, residual_c, B_c, mean, sq_norm, cross_quad, d);
  params.Qa = Qa_c.const_data_ptr();
  params.K = K_c.const_data_ptr();
  params.k = k.mutable_data_ptr();

  const unsigned blocks = num_blocks(n, "item_stats_exact");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, phi.scalar_type(), "item_stats_exact_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flags(bias.has_value(), B_cross.has_value(), [&](auto has_bias, auto has_cross) {
      item_stats_exact_kernel<scalar_t, acc_t, decltype(has_bias)::value, decltype(has_cross)::value>
          <<<blocks, kThreads, 0, stream>>>(params);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, k, sq_norm, cross_quad};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayesvlm_ext, CUDA, m) {
  m.impl("item_stats", &item_stats_cuda);
  m.impl("item_stats_exact", &item_stats_exact_cuda);
}

}  // namespace bayesvlm_ext
