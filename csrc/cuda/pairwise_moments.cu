// CUDA pairwise logit moments and streaming top-k (SPEC.md sections 4 and 7; semantics in moments.h).
//
// pairwise_moments: one fused kernel. Each block computes 64 x 64 tiles of x . y^T with the block-tile
// GEMM of gemm_tile.cuh (fp16/bf16: wmma tensor cores; fp32: tf32 wmma when torch's fp32 matmul
// precision is tf32, CUDA-core FMA otherwise; fp64: CUDA-core FMA), then, with var features, the
// tile of x_var . y_var^T (tf32 or FMA in the accumulation dtype).
// Both land in shared memory, and the epilogue turns them, with the per-item stats, into mean,
// variance and the requested first output, written as coalesced rows of the [N, M] outputs. Tiles
// are walked in groups of kGroupRows query tiles (a 1-D grid, grid-stride over the tiles), so the
// blocks resident at one time share a few x tiles and sweep y together through L2.
//
// topk_moments: the same tile pipeline, but the epilogue feeds sorted per-query lists instead of
// writing pairs. Grid = (query tiles of 64) x (S gallery segments); each block walks its segment
// tile by tile and keeps, per query row, the running top-k (key, index, mean, var) in shared
// memory, sorted by (key desc, index asc). Warp w owns rows [16 w, 16 w + 16): a candidate enters
// only when it ranks before the current k-th entry; the warp finds its place with ballots and
// shifts the tail by one. The block writes its lists to scratch [N, S, k], and a merge kernel (one
// warp per query, heads of the S sorted lists in registers) pops the k best with the same order.
// The key is the score, except for probit: t = mean / sqrt(1 + pi/8 var) ranks, and the value
// returned is sigmoid(t). S fills about kWaves waves of the GPU, keeping segments >= 4 tiles
// and >= 4 k items; extra memory N * S * k * (3 sizeof(acc) + 4) bytes.
// The fused path takes k <= kMaxFusedK = 128 when the lists, 64 k (3 sizeof(acc) + 4) bytes, fit
// the device's shared memory (fp32: always on sm_80/sm_90; fp64: k <= 90 on H100, 54 on A100).
// Larger k streams through pairwise chunks of the gallery and a stable ATen sort instead
// (topk_streaming_fallback), in blocks of queries so that its scratch is bounded whatever N; its keys and
// probit values come from the fused kernel's own device functions, so both paths rank alike.
//
// The "projected" variance (projection features, moments.h) runs in the same kernels: two more GEMM tiles,
// sx = x_proj . y and sy = x . y_proj, both with accumulation-dtype operands (the means converted once for
// fp16/bf16 input, (N + M) D sizeof(acc) bytes), land in shared memory beside the dot tile, and the epilogue
// adds the correction. Its kernels read the first output at run time instead of one instantiation per
// output. The extra tiles shrink the fused top-k's largest k for fp64 (about 52 on H100).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../moments.h"
#include "gemm_tile.cuh"

namespace bayesvlm_ext {
namespace {

using gemm_tile::kAccLd;
using gemm_tile::kThreads;
using gemm_tile::kTile;
using gemm_tile::kWarps;

constexpr int kGroupRows = 16;       // query tiles per group of the pairwise tile order
constexpr int kMaxFusedK = 128;      // largest k of the shared-memory top-k lists
constexpr int kMaxSegments = 256;    // gallery segments per query tile (merge: 8 list heads per lane)
constexpr int kWaves = 3;            // top-k grid: about this many waves of resident blocks
constexpr int kRowsPerWarp = kTile / kWarps;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- per-variant shared memory -----------------------------------------------------------------

// Tag for a GEMM that does not run: VarMath without var features (the variance comes from the Kronecker
// closed form), ProjMath without projection features (the published variance).
struct NoMath {
  using smem_t = char;
  static constexpr int kOperandElems = 0;
};
template <class Math>
constexpr bool kRuns = !std::is_same_v<Math, NoMath>;

// [dot tile] [sx tile, sy tile: projected only] [staging of the running GEMM, reused for the var tile
// afterwards]; every tile acc_t [64][kAccLd].
template <typename acc_t, class MainMath, class VarMath, class ProjMath>
struct TileSmem {
  static constexpr size_t kAccTileBytes = sizeof(acc_t) * kTile * kAccLd;
  static constexpr size_t kSxOffset = kAccTileBytes;
  static constexpr size_t kSyOffset = 2 * kAccTileBytes;
  static constexpr size_t kStagingOffset = (kRuns<ProjMath> ? 3 : 1) * kAccTileBytes;
  static constexpr size_t kMainStaging = 2 * sizeof(typename MainMath::smem_t) * MainMath::kOperandElems;
  static constexpr size_t kVarStaging = 2 * sizeof(typename VarMath::smem_t) * VarMath::kOperandElems;
  static constexpr size_t kProjStaging = 2 * sizeof(typename ProjMath::smem_t) * ProjMath::kOperandElems;
  static constexpr size_t kVarRegion = kRuns<VarMath> ? std::max(kVarStaging, kAccTileBytes) : 0;
  static constexpr size_t kBytes = kStagingOffset + std::max({kMainStaging, kVarRegion, kProjStaging});
  static_assert(kAccTileBytes % 128 == 0 && kBytes % 16 == 0);
};

// ---- epilogue math -------------------------------------------------------------------------------

template <typename acc_t>
__device__ inline acc_t dev_sqrt(acc_t v) {
  if constexpr (std::is_same_v<acc_t, float>) return sqrtf(v); else return sqrt(v);
}

template <typename acc_t>
__device__ inline acc_t dev_fma(acc_t a, acc_t b, acc_t c) {  // a b + c, rounded once
  if constexpr (std::is_same_v<acc_t, float>) return fmaf(a, b, c); else return fma(a, b, c);
}

template <typename acc_t>
__device__ inline acc_t sigmoid(acc_t t) {
  if constexpr (std::is_same_v<acc_t, float>) return 1.0f / (1.0f + expf(-t)); else return 1.0 / (1.0 + exp(-t));
}

// Explicit fused multiply-adds here and in topk_key: every kernel that computes a score (the fused top-k, the
// pairwise kernel, the fallback's key kernel) then rounds it the same way, whatever the compiler would contract.
template <typename acc_t>
__device__ inline acc_t probit_logit(acc_t mean, acc_t var) {
  return mean / dev_sqrt(dev_fma(static_cast<acc_t>(kPiOver8), var, acc_t(1)));
}

template <typename acc_t>
struct Stats {
  acc_t inv_norm, alpha, quad;
  acc_t inv_mu_norm, r;  // projected only (0 otherwise)
};

// One item's stats: [rows, 3], or [rows, 5] with the projected columns.
template <typename acc_t, bool kProjected>
__device__ inline Stats<acc_t> load_stats(const void* stats, int64_t row) {
  const acc_t* s = static_cast<const acc_t*>(stats) + row * (kProjected ? kNumProjectedStats : kNumStats);
  if constexpr (kProjected) {
    return {s[kStatInvNorm], s[kStatAlpha], s[kStatQuad], s[kStatInvMuNorm], s[kStatProjQuad]};
  } else {
    return {s[kStatInvNorm], s[kStatAlpha], s[kStatQuad], acc_t(0), acc_t(0)};
  }
}

// Mean and variance of logit (i, j) from the result tiles and the stats (moments.h).
template <typename acc_t, bool kWithVar, bool kProjected>
struct MomentsEpilogue {
  const acc_t* dot;      // [64][kAccLd] x . y
  const acc_t* var_dot;  // [64][kAccLd] x_var . y_var (kWithVar only)
  const acc_t* sx;       // [64][kAccLd] x_proj . y (kProjected only)
  const acc_t* sy;       // [64][kAccLd] x . y_proj (kProjected only)
  acc_t scale, bias, trace_cross;

  template <class Layout>
  __device__ MomentsEpilogue(const PairwiseParams& in, const unsigned char* smem, Layout)
      : dot(reinterpret_cast<const acc_t*>(smem)),
        var_dot(reinterpret_cast<const acc_t*>(smem + Layout::kStagingOffset)),
        sx(reinterpret_cast<const acc_t*>(smem + Layout::kSxOffset)),
        sy(reinterpret_cast<const acc_t*>(smem + Layout::kSyOffset)),
        scale(static_cast<acc_t>(in.scale)),
        bias(static_cast<acc_t>(in.bias)),
        trace_cross(static_cast<acc_t>(in.trace_cross)) {}

  __device__ void operator()(int r, int c, const Stats<acc_t>& x, const Stats<acc_t>& y, acc_t& mean,
                             acc_t& var) const {
    const int at = r * kAccLd + c;
    const acc_t cos_scale = x.inv_norm * y.inv_norm;
    acc_t dot_var;
    if constexpr (kWithVar) {
      dot_var = var_dot[at];
    } else {
      dot_var = y.alpha * x.quad + x.alpha * y.quad + trace_cross * x.alpha * y.alpha;
    }
    if constexpr (kProjected) {
      // + cos (cos (r_x ||mu_y||^2 + ||mu_x||^2 r_y) - 2 h), clamped at 0 (NaN stays NaN), as the CPU kernel
      const acc_t mu_x = acc_t(1) / x.inv_mu_norm, mu_y = acc_t(1) / y.inv_mu_norm;
      const acc_t cos = dot[at] * x.inv_mu_norm * y.inv_mu_norm;
      const acc_t h = mu_y * sx[at] + mu_x * sy[at];
      const acc_t value = dot_var + cos * (cos * (x.r * (mu_y * mu_y) + (mu_x * mu_x) * y.r) - acc_t(2) * h);
      dot_var = value < acc_t(0) ? acc_t(0) : value;
    }
    mean = scale * dot[at] * cos_scale + bias;
    var = scale * scale * dot_var * cos_scale * cos_scale;
  }
};

// The top-k ranking key (TopkScore); for probit the returned value is sigmoid(key).
template <typename acc_t>
__device__ inline acc_t topk_key(int64_t score, acc_t kappa, acc_t mean, acc_t var) {
  switch (static_cast<TopkScore>(score)) {
    case TopkScore::kMean: return mean;
    case TopkScore::kPessimistic: return dev_fma(-kappa, dev_sqrt(var), mean);
    case TopkScore::kOptimistic: return dev_fma(kappa, dev_sqrt(var), mean);
    default: return probit_logit(mean, var);
  }
}

template <typename acc_t>
__device__ inline acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);  // numeric_limits would need --expt-relaxed-constexpr here
}

// The top-k order (SPEC.md section 12): key descending with NaN after every other key (-inf included),
// then index ascending. Padding is (NaN, -1): as unsigned, -1 is the largest index, so padding ranks
// after every real candidate, NaN ones included, and a query always gets k real rows.
template <typename acc_t>
__device__ inline bool ranks_before(acc_t key_a, int32_t index_a, acc_t key_b, int32_t index_b) {
  const bool nan_a = isnan(key_a), nan_b = isnan(key_b);
  const bool lower_index = static_cast<uint32_t>(index_a) < static_cast<uint32_t>(index_b);
  if (nan_a || nan_b) return nan_b && (!nan_a || lower_index);
  return key_a > key_b || (key_a == key_b && lower_index);
}

// ---- one fused tile --------------------------------------------------------------------------------

template <typename scalar_t>
struct PairOperands {
  using acc_t = at::opmath_type<scalar_t>;
  gemm_tile::Operand<scalar_t> x, y;      // [n, d], [m, d]
  gemm_tile::Operand<acc_t> x_var, y_var;  // [n, k_var], [m, k_var] (unused without var features)
  gemm_tile::Operand<acc_t> x_acc, y_acc, x_proj, y_proj;  // [n, d], [m, d] (unused without projection)
  __device__ explicit PairOperands(const PairwiseParams& in)
      : x(gemm_tile::make_operand<scalar_t>(in.x, in.n, in.d, in.x_row_stride, in.x_col_stride)),
        y(gemm_tile::make_operand<scalar_t>(in.y, in.m, in.d, in.y_row_stride, in.y_col_stride)),
        x_var(gemm_tile::make_operand<acc_t>(in.x_var, in.n, in.k_var, in.k_var, 1)),
        y_var(gemm_tile::make_operand<acc_t>(in.y_var, in.m, in.k_var, in.k_var, 1)),
        x_acc(gemm_tile::make_operand<acc_t>(in.x_acc, in.n, in.d, in.x_acc_row_stride, in.x_acc_col_stride)),
        y_acc(gemm_tile::make_operand<acc_t>(in.y_acc, in.m, in.d, in.y_acc_row_stride, in.y_acc_col_stride)),
        x_proj(gemm_tile::make_operand<acc_t>(in.x_proj, in.n, in.d, in.d, 1)),
        y_proj(gemm_tile::make_operand<acc_t>(in.y_proj, in.m, in.d, in.d, 1)) {}
};

// Leaves the result tiles of TileSmem, each acc_t [64][kAccLd]: dot[r][c] = x[n0 + r] . y[m0 + c]; with
// projection, sx = x_proj . y and sy = x . y_proj (both in the accumulation dtype); with var features,
// x_var . y_var. Ends with a barrier. The caller must not read the previous tile's results any more (a
// barrier after them).
template <typename scalar_t, class MainMath, class VarMath, class ProjMath>
__device__ void compute_tile(const PairOperands<scalar_t>& ops, int64_t n0, int64_t m0, unsigned char* smem) {
  using acc_t = at::opmath_type<scalar_t>;
  using Layout = TileSmem<acc_t, MainMath, VarMath, ProjMath>;
  unsigned char* staging = smem + Layout::kStagingOffset;  // never overlaps the result tiles before it
  {
    typename MainMath::Acc acc;
    auto* slab = reinterpret_cast<typename MainMath::smem_t*>(staging);
    gemm_tile::gemm_tile<MainMath>(acc, ops.x, n0, ops.y, m0, slab, slab + MainMath::kOperandElems);
    MainMath::store(acc, reinterpret_cast<acc_t*>(smem));
  }
  if constexpr (kRuns<ProjMath>) {
    // Each GEMM ended with a barrier (or never touched the staging): it is free again.
    auto* slab = reinterpret_cast<typename ProjMath::smem_t*>(staging);
    {
      typename ProjMath::Acc acc;
      gemm_tile::gemm_tile<ProjMath>(acc, ops.x_proj, n0, ops.y_acc, m0, slab, slab + ProjMath::kOperandElems);
      ProjMath::store(acc, reinterpret_cast<acc_t*>(smem + Layout::kSxOffset));
    }
    {
      typename ProjMath::Acc acc;
      gemm_tile::gemm_tile<ProjMath>(acc, ops.x_acc, n0, ops.y_proj, m0, slab, slab + ProjMath::kOperandElems);
      ProjMath::store(acc, reinterpret_cast<acc_t*>(smem + Layout::kSyOffset));
    }
  }
  if constexpr (kRuns<VarMath>) {
    // The GEMMs before ended with a barrier (or never touched the staging): it is free again.
    typename VarMath::Acc acc;
    auto* slab = reinterpret_cast<typename VarMath::smem_t*>(staging);
    gemm_tile::gemm_tile<VarMath>(acc, ops.x_var, n0, ops.y_var, m0, slab, slab + VarMath::kOperandElems);
    VarMath::store(acc, reinterpret_cast<acc_t*>(staging));
  }
  __syncthreads();
}

// ---- pairwise_moments --------------------------------------------------------------------------------

// kOutput: a MomentsOutput, or kRuntimeOutput to read it from the parameters (the projected kernels, which
// are not instantiated once per output).
constexpr int kRuntimeOutput = -1;

template <int kOutput, typename acc_t>
__device__ inline acc_t first_output(acc_t mean, acc_t var, int64_t output) {
  if constexpr (kOutput == kRuntimeOutput) {
    switch (static_cast<MomentsOutput>(output)) {
      case MomentsOutput::kMean: return mean;
      case MomentsOutput::kProbitLogit: return probit_logit(mean, var);
      default: return sigmoid(probit_logit(mean, var));
    }
  } else if constexpr (kOutput == static_cast<int>(MomentsOutput::kMean)) {
    return mean;
  } else if constexpr (kOutput == static_cast<int>(MomentsOutput::kProbitLogit)) {
    return probit_logit(mean, var);
  } else {
    return sigmoid(probit_logit(mean, var));
  }
}

// Tensor-core variants fit 128 registers (sm_80 with a tf32 var GEMM: a 12-byte spill): ask for 4
// resident blocks per SM. The CUDA-core tiles need more (fp64: ~240), so they get no minimum.
template <class MainMath>
constexpr int kMinBlocks = std::is_same_v<MainMath, gemm_tile::SimtMath<float>> ||
                                   std::is_same_v<MainMath, gemm_tile::SimtMath<double>>
                               ? 1
                               : 4;

template <typename scalar_t, class MainMath, class VarMath, class ProjMath, int kOutput>
__global__ void __launch_bounds__(kThreads, kMinBlocks<MainMath>)
    pairwise_moments_kernel(PairwiseMomentsParams params) {
#ifdef BAYESVLM_EXT_HAS_WMMA
  using acc_t = at::opmath_type<scalar_t>;
  using Layout = TileSmem<acc_t, MainMath, VarMath, ProjMath>;
  constexpr bool kProjected = kRuns<ProjMath>;
  extern __shared__ __align__(128) unsigned char smem[];
  const PairwiseParams& in = params.in;
  const PairOperands<scalar_t> ops(in);
  const MomentsEpilogue<acc_t, kRuns<VarMath>, kProjected> epilogue(in, smem, Layout{});
  auto* out_first = static_cast<acc_t*>(params.out_first);  // [n, m]
  auto* out_var = static_cast<acc_t*>(params.out_var);      // [n, m]

  const int64_t n_tiles = ceil_div(in.n, kTile), m_tiles = ceil_div(in.m, kTile);
  for (int64_t tile = blockIdx.x; tile < n_tiles * m_tiles; tile += gridDim.x) {
    // Groups of kGroupRows query tiles, each group walked column of tiles by column of tiles.
    const int64_t group = tile / (kGroupRows * m_tiles);
    const int64_t first_row = group * kGroupRows;
    const int64_t group_rows = min(static_cast<int64_t>(kGroupRows), n_tiles - first_row);
    const int64_t in_group = tile - group * kGroupRows * m_tiles;
    const int64_t n0 = (first_row + in_group % group_rows) * kTile;
    const int64_t m0 = (in_group / group_rows) * kTile;

    compute_tile<scalar_t, MainMath, VarMath, ProjMath>(ops, n0, m0, smem);

    // Thread t writes column t % 64 of rows t / 64, t / 64 + 2, ...: each warp stores 32 consecutive outputs.
    const int c = threadIdx.x % kTile;
    const int64_t j = m0 + c;
    if (j < in.m) {
      const Stats<acc_t> ys = load_stats<acc_t, kProjected>(in.y_stats, j);
      for (int r = threadIdx.x / kTile; r < kTile && n0 + r < in.n; r += kThreads / kTile) {
        const int64_t i = n0 + r;
        acc_t mean, var;
        epilogue(r, c, load_stats<acc_t, kProjected>(in.x_stats, i), ys, mean, var);
        out_first[i * in.m + j] = first_output<kOutput>(mean, var, params.output);
        out_var[i * in.m + j] = var;
      }
    }
    __syncthreads();  // the tiles are read before the next compute_tile overwrites them
  }
#else
  __trap();
#endif
}

// ---- topk_moments ----------------------------------------------------------------------------------------

// Per-segment candidates, each [n, segments, k]: rows of k sorted entries, padded with (NaN, -1).
struct TopkScratch {
  void* key;
  int32_t* index;
  void* mean;
  void* var;
  int64_t segments, tiles_per_segment;
};

// One query row's sorted list in shared memory (k entries of each field).
template <typename acc_t>
struct RowList {
  acc_t* key;
  acc_t* mean;
  acc_t* var;
  int32_t* index;
};

// Offers each lane's candidate (where `offer`) to the warp's sorted list of length k, one lane at a
// time. Every lane reads the list after the same __syncwarp(), so all decisions are warp-uniform.
template <typename acc_t>
__device__ void offer_candidates(bool offer, acc_t key, int32_t index, acc_t mean, acc_t var,
                                 const RowList<acc_t>& list, int k, int lane) {
  unsigned pending = __ballot_sync(kFullMask, offer && ranks_before(key, index, list.key[k - 1], list.index[k - 1]));
  while (pending != 0) {
    const int src = __ffs(pending) - 1;
    pending &= pending - 1;
    const acc_t c_key = __shfl_sync(kFullMask, key, src);
    const int32_t c_index = __shfl_sync(kFullMask, index, src);
    const acc_t c_mean = __shfl_sync(kFullMask, mean, src);
    const acc_t c_var = __shfl_sync(kFullMask, var, src);
    if (!ranks_before(c_key, c_index, list.key[k - 1], list.index[k - 1])) continue;  // list improved meanwhile
    // Its place: the number of entries that rank before it (a prefix of the sorted list).
    int pos = 0;
    for (int base = 0; base < k; base += 32) {
      const int q = base + lane;
      pos += __popc(__ballot_sync(kFullMask, q < k && ranks_before(list.key[q], list.index[q], c_key, c_index)));
    }
    // Entries [pos, k - 2] move to [pos + 1, k - 1]: all reads before any write.
    constexpr int kPerLane = kMaxFusedK / 32;
    acc_t keys[kPerLane], means[kPerLane], vars[kPerLane];
    int32_t indices[kPerLane];
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int q = pos + 1 + lane + 32 * t;
      if (q < k) {
        keys[t] = list.key[q - 1], means[t] = list.mean[q - 1], vars[t] = list.var[q - 1];
        indices[t] = list.index[q - 1];
      }
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int q = pos + 1 + lane + 32 * t;
      if (q < k) {
        list.key[q] = keys[t], list.mean[q] = means[t], list.var[q] = vars[t];
        list.index[q] = indices[t];
      }
    }
    if (lane == 0) {
      list.key[pos] = c_key, list.mean[pos] = c_mean, list.var[pos] = c_var;
      list.index[pos] = c_index;
    }
    __syncwarp();
  }
}

template <typename acc_t, class MainMath, class VarMath, class ProjMath>
constexpr size_t topk_smem_bytes(int64_t k) {
  return TileSmem<acc_t, MainMath, VarMath, ProjMath>::kBytes +
         static_cast<size_t>(kTile) * static_cast<size_t>(k) * (3 * sizeof(acc_t) + sizeof(int32_t));
}

// Block (q, s): queries [64 q, 64 q + 64) against gallery tiles [s tps, (s + 1) tps) of segment s.
template <typename scalar_t, class MainMath, class VarMath, class ProjMath>
__global__ void __launch_bounds__(kThreads) topk_segment_kernel(TopkParams params, TopkScratch scratch) {
#ifdef BAYESVLM_EXT_HAS_WMMA
  using acc_t = at::opmath_type<scalar_t>;
  using Layout = TileSmem<acc_t, MainMath, VarMath, ProjMath>;
  constexpr bool kProjected = kRuns<ProjMath>;
  extern __shared__ __align__(128) unsigned char smem[];
  const PairwiseParams& in = params.in;
  const PairOperands<scalar_t> ops(in);
  const MomentsEpilogue<acc_t, kRuns<VarMath>, kProjected> epilogue(in, smem, Layout{});
  const acc_t kappa = static_cast<acc_t>(params.kappa);
  const int k = static_cast<int>(params.k);
  // The lists, after the tiles: key, mean, var [64][k] acc_t, then index [64][k] int32.
  auto* list_key = reinterpret_cast<acc_t*>(smem + Layout::kBytes);
  auto* list_index = reinterpret_cast<int32_t*>(list_key + 3 * kTile * k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto row_list = [&](int r) {
    return RowList<acc_t>{list_key + r * k, list_key + (kTile + r) * k, list_key + (2 * kTile + r) * k,
                          list_index + r * k};
  };

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t segment = blockIdx.y;
  const int64_t tile_begin = segment * scratch.tiles_per_segment;
  const int64_t tile_end = min(ceil_div(in.m, kTile), tile_begin + scratch.tiles_per_segment);

  // Each warp initialises and then alone touches its own rows' lists.
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const RowList<acc_t> list = row_list(warp * kRowsPerWarp + rr);
    for (int q = lane; q < k; q += 32) {
      list.key[q] = quiet_nan<acc_t>();
      list.mean[q] = acc_t(0);
      list.var[q] = acc_t(0);
      list.index[q] = -1;
    }
  }
  __syncwarp();

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t m0 = tile * kTile;
    compute_tile<scalar_t, MainMath, VarMath, ProjMath>(ops, n0, m0, smem);

    // Lane l scores columns l and l + 32 of the tile for each of its warp's rows.
    bool column_ok[2];
    Stats<acc_t> ys[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = m0 + lane + 32 * h;
      column_ok[h] = j < in.m;
      ys[h] = column_ok[h] ? load_stats<acc_t, kProjected>(in.y_stats, j) : Stats<acc_t>{};
    }
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (n0 + r >= in.n) break;  // warp-uniform
      const Stats<acc_t> xs = load_stats<acc_t, kProjected>(in.x_stats, n0 + r);
      const RowList<acc_t> list = row_list(r);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = lane + 32 * h;
        acc_t mean = acc_t(0), var = acc_t(0), key = acc_t(0);
        if (column_ok[h]) {
          epilogue(r, c, xs, ys[h], mean, var);
          key = topk_key(params.score, kappa, mean, var);
        }
        offer_candidates(column_ok[h], key, static_cast<int32_t>(m0 + c), mean, var, list, k, lane);
      }
    }
    __syncthreads();  // the tiles are read before the next compute_tile overwrites them
  }

  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const int64_t i = n0 + r;
    if (i >= in.n) break;
    const RowList<acc_t> list = row_list(r);
    const int64_t base = (i * scratch.segments + segment) * k;
    for (int q = lane; q < k; q += 32) {
      static_cast<acc_t*>(scratch.key)[base + q] = list.key[q];
      static_cast<acc_t*>(scratch.mean)[base + q] = list.mean[q];
      static_cast<acc_t*>(scratch.var)[base + q] = list.var[q];
      scratch.index[base + q] = list.index[q];
    }
  }
#else
  __trap();
#endif
}

// One warp per query: lane l holds the heads of segments l, l + 32, ... and each of the k rounds pops
// the best head of the warp (ties between padding heads go to the lower lane).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) topk_merge_kernel(TopkParams params, TopkScratch scratch) {
  constexpr int kSlots = kMaxSegments / 32;
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= params.in.n) return;  // whole warps leave; no block barrier follows
  const int64_t k = params.k, segments = scratch.segments;
  const int64_t row = i * segments * k;
  const auto* cand_key = static_cast<const acc_t*>(scratch.key) + row;  // [segments, k]
  const int32_t* cand_index = scratch.index + row;
  const auto* cand_mean = static_cast<const acc_t*>(scratch.mean) + row;
  const auto* cand_var = static_cast<const acc_t*>(scratch.var) + row;

  int64_t head[kSlots] = {};  // next unread entry of each held segment
  acc_t head_key[kSlots];
  int32_t head_index[kSlots];
  const auto load_head = [&](int t) {
    const int64_t s = lane + 32 * t;
    const bool real = s < segments && head[t] < k;
    head_key[t] = real ? cand_key[s * k + head[t]] : quiet_nan<acc_t>();
    head_index[t] = real ? cand_index[s * k + head[t]] : -1;
  };
#pragma unroll
  for (int t = 0; t < kSlots; ++t) load_head(t);

  for (int64_t round = 0; round < k; ++round) {
    int best = 0;
    acc_t win_key = head_key[0];
    int32_t win_index = head_index[0];
#pragma unroll
    for (int t = 1; t < kSlots; ++t) {
      if (ranks_before(head_key[t], head_index[t], win_key, win_index)) {
        best = t, win_key = head_key[t], win_index = head_index[t];
      }
    }
    int win_lane = lane;
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t o_key = __shfl_xor_sync(kFullMask, win_key, offset);
      const int32_t o_index = __shfl_xor_sync(kFullMask, win_index, offset);
      const int o_lane = __shfl_xor_sync(kFullMask, win_lane, offset);
      // Only padding heads share an index (-1); between them the lower lane wins, so all lanes agree.
      if (ranks_before(o_key, o_index, win_key, win_index) || (o_index == win_index && o_lane < win_lane)) {
        win_key = o_key, win_index = o_index, win_lane = o_lane;
      }
    }
    if (lane == win_lane) {
#pragma unroll
      for (int t = 0; t < kSlots; ++t) {
        if (t != best) continue;
        const int64_t s = lane + 32 * t;
        const int64_t out = i * k + round;
        if (s < segments && head[t] < k) {  // always: the k <= M real candidates outnumber the rounds
          const int64_t src = s * k + head[t];
          const acc_t key = cand_key[src];
          static_cast<acc_t*>(params.values)[out] =
              params.score == static_cast<int64_t>(TopkScore::kProbit) ? sigmoid(key) : key;
          params.indices[out] = cand_index[src];
          static_cast<acc_t*>(params.mean)[out] = cand_mean[src];
          static_cast<acc_t*>(params.var)[out] = cand_var[src];
        }
        ++head[t];
        load_head(t);
      }
    }
  }
}

// ---- host ------------------------------------------------------------------------------------------------

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// Calls f(MainMath{}, VarMath{}, ProjMath{}) with the GEMM policies of this input dtype, tf32 setting, var
// features and projection (NoMath for a GEMM that does not run). Every GEMM of accumulation-dtype operands
// (var features, projection, and the main one of fp32/fp64 input) takes the same policy: tf32 tensor
// cores or CUDA-core FMA for fp32, FMA for fp64.
template <typename scalar_t, typename F>
void dispatch_math(bool tf32, bool has_var, bool has_proj, F&& f) {
  using gemm_tile::SimtMath;
  using gemm_tile::Tf32Math;
  const auto with = [&](auto main_math, auto acc_math) {
    using AccMath = decltype(acc_math);
    if (has_var && has_proj) f(main_math, AccMath{}, AccMath{});
    else if (has_var) f(main_math, AccMath{}, NoMath{});
    else if (has_proj) f(main_math, NoMath{}, AccMath{});
    else f(main_math, NoMath{}, NoMath{});
  };
  if constexpr (std::is_same_v<scalar_t, double>) {
    with(SimtMath<double>{}, SimtMath<double>{});
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (tf32) with(Tf32Math{}, Tf32Math{}); else with(SimtMath<float>{}, SimtMath<float>{});
  } else {
    using MainMath = gemm_tile::Wmma16Math<scalar_t>;
    if (tf32) with(MainMath{}, Tf32Math{}); else with(MainMath{}, SimtMath<float>{});
  }
}

// Raises the kernel's dynamic shared-memory limit to the device's opt-in maximum. Always that one value,
// whatever this launch needs: two host threads launching with different sizes would otherwise race
// (one lowers the limit between the other's set and launch, which then fails).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int device) {
  const int limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
}

// TF32 for fp32 data (the main GEMM of fp32 input, every var-feature GEMM) follows torch's fp32 matmul
// setting, read the way torch 2.15's own cuBLAS path reads it (allowTF32CuBLAS() raises as "a mix of
// the legacy and new APIs" once torch.backends.cuda.matmul.fp32_precision = "tf32" was set).
bool use_tf32() {
  return !at::NoTF32Guard::should_disable_tf32() &&
         at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
             at::Float32Precision::TF32;
}

void check_device(const char* op, int device) {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  TORCH_CHECK(major >= 8, op, ": the CUDA kernels need compute capability 8.0 or newer, got ", major, ".x");
}

// The parameters of one pairwise launch (tensors undefined where absent; all but x, y, xa, ya contiguous).
// The caller keeps every tensor alive while the kernel runs.
PairwiseParams cuda_pairwise_params(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xs,
                                    const at::Tensor& ys, const at::Tensor& xv, const at::Tensor& yv,
                                    const at::Tensor& xa, const at::Tensor& ya, const at::Tensor& xp,
                                    const at::Tensor& yp, double scale, double bias, double trace_cross) {
  PairwiseParams p = make_pairwise_params(x, y, xs, ys, xv.defined() ? &xv : nullptr, yv.defined() ? &yv : nullptr,
                                          scale, bias, trace_cross);
  if (xp.defined()) {
    p.x_proj = xp.const_data_ptr();
    p.y_proj = yp.const_data_ptr();
    p.x_acc = xa.const_data_ptr();
    p.x_acc_row_stride = xa.stride(0);
    p.x_acc_col_stride = xa.stride(1);
    p.y_acc = ya.const_data_ptr();
    p.y_acc_row_stride = ya.stride(0);
    p.y_acc_col_stride = ya.stride(1);
  }
  return p;
}

// The means in the accumulation dtype, the projection GEMMs' operands: the tensor itself for fp32/fp64.
at::Tensor in_acc_dtype(const at::Tensor& t) {
  const auto acc = moments_acc_dtype(t.scalar_type());
  return t.scalar_type() == acc ? t : t.to(acc);
}

// Launches the fused pairwise kernel; the caller has checked and filled the parameters (n, m > 0).
void launch_pairwise_moments(const PairwiseMomentsParams& params, c10::ScalarType dtype, bool has_var, bool has_proj,
                             cudaStream_t stream) {
  const int64_t tiles = ceil_div(params.in.n, kTile) * ceil_div(params.in.m, kTile);
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(tiles, std::numeric_limits<int32_t>::max()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pairwise_moments_cuda", [&] {
    dispatch_math<scalar_t>(use_tf32(), has_var, has_proj, [&](auto main_math, auto var_math, auto proj_math) {
      using MainMath = decltype(main_math);
      using VarMath = decltype(var_math);
      using ProjMath = decltype(proj_math);
      const size_t smem = TileSmem<at::opmath_type<scalar_t>, MainMath, VarMath, ProjMath>::kBytes;
      const auto launch = [&](auto kernel) {
        allow_dynamic_smem(kernel, c10::cuda::current_device());
        kernel<<<blocks, kThreads, smem, stream>>>(params);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if constexpr (kRuns<ProjMath>) {  // one kernel for the three outputs
        launch(pairwise_moments_kernel<scalar_t, MainMath, VarMath, ProjMath, kRuntimeOutput>);
      } else {
        switch (static_cast<MomentsOutput>(params.output)) {
          case MomentsOutput::kMean: launch(pairwise_moments_kernel<scalar_t, MainMath, VarMath, ProjMath, 0>); break;
          case MomentsOutput::kProbitLogit:
            launch(pairwise_moments_kernel<scalar_t, MainMath, VarMath, ProjMath, 1>);
            break;
          default: launch(pairwise_moments_kernel<scalar_t, MainMath, VarMath, ProjMath, 2>); break;
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> pairwise_moments_cuda(const at::Tensor& x,        // [N, D]
                                                         const at::Tensor& y,        // [M, D]
                                                         const at::Tensor& x_stats,  // [N, 3]
                                                         const at::Tensor& y_stats,  // [M, 3]
                                                         const std::optional<at::Tensor>& x_var,  // [N, K]
                                                         const std::optional<at::Tensor>& y_var,  // [M, K]
                                                         double scale, double bias, double trace_cross,
                                                         int64_t output,
                                                         const std::optional<at::Tensor>& x_proj,  // [N, K2]
                                                         const std::optional<at::Tensor>& y_proj) {
  check_pairwise_inputs("pairwise_moments", x, y, x_stats, y_stats, x_var, y_var, x_proj, y_proj);
  check_pairwise_scalars("pairwise_moments", scale, bias, trace_cross);
  check_moments_output(output);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = x.size(0), m = y.size(0);
  const auto acc_options = x.options().dtype(moments_acc_dtype(x.scalar_type()));
  at::Tensor first = at::empty({n, m}, acc_options);  // [N, M]
  at::Tensor var = at::empty({n, m}, acc_options);    // [N, M]
  if (n == 0 || m == 0) return {first, var};
  check_device("pairwise_moments", x.device().index());
  const at::Tensor xs = x_stats.contiguous(), ys = y_stats.contiguous();
  at::Tensor xv, yv, xa, ya, xp, yp;
  if (x_var.has_value()) xv = x_var->contiguous(), yv = y_var->contiguous();
  if (x_proj.has_value()) xp = x_proj->contiguous(), yp = y_proj->contiguous(), xa = in_acc_dtype(x), ya = in_acc_dtype(y);
  const PairwiseMomentsParams params{
      cuda_pairwise_params(x, y, xs, ys, xv, yv, xa, ya, xp, yp, scale, bias, trace_cross), output,
      first.mutable_data_ptr(), var.mutable_data_ptr()};
  launch_pairwise_moments(params, x.scalar_type(), xv.defined(), xp.defined(), c10::cuda::getCurrentCUDAStream());
  return {first, var};
}

// Runs the fused top-k if its lists fit the device's shared memory; returns whether it ran.
template <typename scalar_t, class MainMath, class VarMath, class ProjMath>
bool launch_topk_fused(const TopkParams& params, const at::TensorOptions& acc_options, int device,
                       cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t smem = topk_smem_bytes<acc_t, MainMath, VarMath, ProjMath>(params.k);
  if (smem > static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device))) return false;
  const auto kernel = topk_segment_kernel<scalar_t, MainMath, VarMath, ProjMath>;
  allow_dynamic_smem(kernel, device);
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, smem));
  const int64_t resident = static_cast<int64_t>(std::max(blocks_per_sm, 1)) *
                           device_attribute(cudaDevAttrMultiProcessorCount, device);

  const int64_t n = params.in.n, k = params.k;
  const int64_t query_tiles = ceil_div(n, kTile), gallery_tiles = ceil_div(params.in.m, kTile);
  const int64_t min_segment_tiles = std::max<int64_t>(4, ceil_div(4 * k, kTile));
  const int64_t max_segments =
      std::clamp<int64_t>(gallery_tiles / min_segment_tiles, 1, kMaxSegments);
  const int64_t wanted = std::clamp<int64_t>(ceil_div(kWaves * resident, query_tiles), 1, max_segments);
  const int64_t tiles_per_segment = ceil_div(gallery_tiles, wanted);
  const int64_t segments = ceil_div(gallery_tiles, tiles_per_segment);  // none left empty
  TORCH_CHECK(query_tiles <= std::numeric_limits<int32_t>::max(), "topk_moments: too many queries for one launch");

  at::Tensor key = at::empty({n, segments, k}, acc_options);  // [N, S, k] each
  at::Tensor index = at::empty({n, segments, k}, acc_options.dtype(at::kInt));
  at::Tensor mean = at::empty({n, segments, k}, acc_options);
  at::Tensor var = at::empty({n, segments, k}, acc_options);
  const TopkScratch scratch{key.mutable_data_ptr(), index.mutable_data_ptr<int32_t>(), mean.mutable_data_ptr(),
                            var.mutable_data_ptr(), segments, tiles_per_segment};
  kernel<<<dim3(static_cast<unsigned>(query_tiles), static_cast<unsigned>(segments)), kThreads, smem, stream>>>(
      params, scratch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  topk_merge_kernel<acc_t><<<static_cast<unsigned>(ceil_div(n, kWarps)), kThreads, 0, stream>>>(params, scratch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;  // the scratch tensors go back to the caching allocator in stream order
}

// The fallback's element-wise steps with the fused kernel's own device functions: key[i] = topk_key(mean[i],
// var[i]), and the probit's reported value sigmoid(key). Both paths then give the same keys bit for bit, near-ties
// included, and so the same rows in the same order (ATen's mul/add/sqrt rounded differently from one FMA).
template <typename acc_t>
__global__ void topk_key_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var, int64_t count,
                                int64_t score, acc_t kappa, acc_t* __restrict__ key) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    key[i] = topk_key(score, kappa, mean[i], var[i]);
  }
}

template <typename acc_t>
__global__ void sigmoid_kernel(const acc_t* __restrict__ key, int64_t count, acc_t* __restrict__ value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    value[i] = sigmoid(key[i]);
  }
}

unsigned elementwise_blocks(int64_t count) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(count, kThreads), 1, 65535));
}

// key [rows, C] of contiguous mean and var [rows, C] in the accumulation dtype.
at::Tensor topk_key_cuda(const at::Tensor& mean, const at::Tensor& var, int64_t score, double kappa,
                         cudaStream_t stream) {
  at::Tensor key = at::empty_like(mean);
  if (mean.numel() == 0) return key;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "topk_key_cuda", [&] {
    topk_key_kernel<scalar_t><<<elementwise_blocks(mean.numel()), kThreads, 0, stream>>>(
        mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), mean.numel(), score,
        static_cast<scalar_t>(kappa), key.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return key;
}

// sigmoid of a contiguous key tensor, as the fused kernel reports probit values.
at::Tensor sigmoid_cuda(const at::Tensor& key, cudaStream_t stream) {
  at::Tensor value = at::empty_like(key);
  if (key.numel() == 0) return value;
  AT_DISPATCH_FLOATING_TYPES(key.scalar_type(), "sigmoid_cuda", [&] {
    sigmoid_kernel<scalar_t><<<elementwise_blocks(key.numel()), kThreads, 0, stream>>>(
        key.const_data_ptr<scalar_t>(), key.numel(), value.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return value;
}

// The stable top-k order of each row of key [N, C] (SPEC.md section 12), as the fused kernel ranks:
// descending, NaN after every other key, ties by column. Two stable sorts: by key with NaN as -inf
// (+0 makes -0 equal to 0 for the radix sort), then NaN rows to the back.
at::Tensor nan_last_order(const at::Tensor& key) {
  const at::Tensor nan = key.isnan();
  const at::Tensor by_key = std::get<1>(at::sort(key.masked_fill(nan, -INFINITY).add(0.0), /*stable=*/true,
                                                 /*dim=*/1, /*descending=*/true));
  const at::Tensor nan_back = std::get<1>(at::sort(nan.gather(1, by_key).to(at::kByte), /*stable=*/true,
                                                   /*dim=*/1, /*descending=*/false));
  return by_key.gather(1, nan_back);
}

// Top-k for k beyond the shared-memory lists, still streaming, for one block of queries: the pairwise kernel
// fills an [rows, chunk] block of the gallery at a time, and a stable descending sort of [running top-k | chunk]
// keeps the best k. Running candidates always have the lower indices, so the stable sort keeps ties by index.
// Writes rows [0, x.size(0)) of values, indices, mean_out and var_out (views of the outputs' rows).
void topk_fallback_block(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xs, const at::Tensor& ys,
                         const at::Tensor& xv, const at::Tensor& yv, const at::Tensor& xa, const at::Tensor& ya,
                         const at::Tensor& xp, const at::Tensor& yp, double scale, double bias, double trace_cross,
                         int64_t k, int64_t score, double kappa, int64_t chunk, at::Tensor values, at::Tensor indices,
                         at::Tensor mean_out, at::Tensor var_out, cudaStream_t stream) {
  const int64_t n = x.size(0), m = y.size(0);
  at::Tensor run_key, run_index, run_mean, run_var;  // [n, <= k], sorted
  for (int64_t c0 = 0; c0 < m; c0 += chunk) {
    const int64_t len = std::min(chunk, m - c0);
    at::Tensor mean = at::empty({n, len}, values.options());  // [n, len]
    at::Tensor var = at::empty({n, len}, values.options());
    const at::Tensor y_chunk = y.narrow(0, c0, len), ys_chunk = ys.narrow(0, c0, len);
    const at::Tensor yv_chunk = yv.defined() ? yv.narrow(0, c0, len) : at::Tensor();
    const at::Tensor ya_chunk = ya.defined() ? ya.narrow(0, c0, len) : at::Tensor();
    const at::Tensor yp_chunk = yp.defined() ? yp.narrow(0, c0, len) : at::Tensor();
    const PairwiseMomentsParams params{
        cuda_pairwise_params(x, y_chunk, xs, ys_chunk, xv, yv_chunk, xa, ya_chunk, xp, yp_chunk, scale, bias,
                             trace_cross),
        static_cast<int64_t>(MomentsOutput::kMean), mean.mutable_data_ptr(), var.mutable_data_ptr()};
    launch_pairwise_moments(params, x.scalar_type(), xv.defined(), xp.defined(), stream);
    at::Tensor key = topk_key_cuda(mean, var, score, kappa, stream);
    at::Tensor index = at::arange(c0, c0 + len, indices.options()).expand({n, len});
    if (run_key.defined()) {
      key = at::cat({run_key, key}, 1);
      index = at::cat({run_index, index}, 1);
      mean = at::cat({run_mean, mean}, 1);
      var = at::cat({run_var, var}, 1);
    }
    const int64_t keep = std::min(k, key.size(1));
    const at::Tensor order = nan_last_order(key).narrow(1, 0, keep);
    run_key = key.gather(1, order);
    run_index = index.gather(1, order);
    run_mean = mean.gather(1, order);
    run_var = var.gather(1, order);
  }
  values.copy_(score == static_cast<int64_t>(TopkScore::kProbit) ? sigmoid_cuda(run_key, stream) : run_key);
  indices.copy_(run_index);
  mean_out.copy_(run_mean);
  var_out.copy_(run_var);
}

// Elements of one [rows, k + chunk] tensor of the fallback's scratch. The scratch holds about a dozen such
// tensors (the chunk's moments and keys, the concatenated lists, the sort's keys and orders), so queries go
// through in blocks of kFallbackElements / (k + chunk) rows: the scratch stays under about 12 * 2^24 elements
// (1.6 GB in float64) whatever N, and the memory is O(N k), the outputs (SPEC.md section 7).
constexpr int64_t kFallbackElements = int64_t{1} << 24;

void topk_streaming_fallback(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xs, const at::Tensor& ys,
                             const at::Tensor& xv, const at::Tensor& yv, const at::Tensor& xa, const at::Tensor& ya,
                             const at::Tensor& xp, const at::Tensor& yp, double scale, double bias, double trace_cross,
                             int64_t k, int64_t score, double kappa, at::Tensor& values, at::Tensor& indices,
                             at::Tensor& mean_out, at::Tensor& var_out, cudaStream_t stream) {
  const int64_t n = x.size(0);
  const int64_t chunk = std::clamp<int64_t>((int64_t{1} << 26) / n / kTile * kTile, 1024, 8192);
  const int64_t rows = std::max<int64_t>(1, kFallbackElements / (k + chunk));
  const auto block = [](const at::Tensor& t, int64_t q0, int64_t len) {
    return t.defined() ? t.narrow(0, q0, len) : at::Tensor();
  };
  for (int64_t q0 = 0; q0 < n; q0 += rows) {
    const int64_t len = std::min(rows, n - q0);
    topk_fallback_block(x.narrow(0, q0, len), y, xs.narrow(0, q0, len), ys, block(xv, q0, len), yv,
                        block(xa, q0, len), ya, block(xp, q0, len), yp, scale, bias, trace_cross, k, score, kappa,
                        chunk, values.narrow(0, q0, len), indices.narrow(0, q0, len), mean_out.narrow(0, q0, len),
                        var_out.narrow(0, q0, len), stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_moments_cuda(
    const at::Tensor& x,                      // [N, D]
    const at::Tensor& y,                      // [M, D]
    const at::Tensor& x_stats,                // [N, 3]
    const at::Tensor& y_stats,                // [M, 3]
    const std::optional<at::Tensor>& x_var,  // [N, K]
    const std::optional<at::Tensor>& y_var,  // [M, K]
    double scale, double bias, double trace_cross, int64_t k, int64_t score, double kappa,
    const std::optional<at::Tensor>& x_proj,  // [N, K2]
    const std::optional<at::Tensor>& y_proj) {
  check_pairwise_inputs("topk_moments", x, y, x_stats, y_stats, x_var, y_var, x_proj, y_proj);
  check_pairwise_scalars("topk_moments", scale, bias, trace_cross);
  const int64_t n = x.size(0), m = y.size(0);
  check_topk_args(k, m, score, kappa);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto acc_options = x.options().dtype(moments_acc_dtype(x.scalar_type()));
  at::Tensor values = at::empty({n, k}, acc_options);                 // [N, k]
  at::Tensor indices = at::empty({n, k}, x.options().dtype(at::kLong));  // [N, k]
  at::Tensor mean = at::empty({n, k}, acc_options);                   // [N, k]
  at::Tensor var = at::empty({n, k}, acc_options);                    // [N, k]
  if (n == 0 || k == 0) return {values, indices, mean, var};
  const int device = x.device().index();
  check_device("topk_moments", device);
  const at::Tensor xs = x_stats.contiguous(), ys = y_stats.contiguous();
  at::Tensor xv, yv, xa, ya, xp, yp;
  if (x_var.has_value()) xv = x_var->contiguous(), yv = y_var->contiguous();
  if (x_proj.has_value()) xp = x_proj->contiguous(), yp = y_proj->contiguous(), xa = in_acc_dtype(x), ya = in_acc_dtype(y);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  bool fused = false;
  if (k <= kMaxFusedK && m <= std::numeric_limits<int32_t>::max()) {  // list indices are int32
    const TopkParams params{cuda_pairwise_params(x, y, xs, ys, xv, yv, xa, ya, xp, yp, scale, bias, trace_cross),
                            k,
                            score,
                            kappa,
                            values.mutable_data_ptr(),
                            indices.mutable_data_ptr<int64_t>(),
                            mean.mutable_data_ptr(),
                            var.mutable_data_ptr()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_moments_cuda", [&] {
      dispatch_math<scalar_t>(use_tf32(), xv.defined(), xp.defined(), [&](auto main_math, auto var_math,
                                                                          auto proj_math) {
        fused = launch_topk_fused<scalar_t, decltype(main_math), decltype(var_math), decltype(proj_math)>(
            params, acc_options, device, stream);
      });
    });
  }
  if (!fused) {
    topk_streaming_fallback(x, y, xs, ys, xv, yv, xa, ya, xp, yp, scale, bias, trace_cross, k, score, kappa, values, indices,
                            mean, var, stream);
  }
  return {values, indices, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayesvlm_ext, CUDA, m) {
  m.impl("pairwise_moments", &pairwise_moments_cuda);
  m.impl("topk_moments", &topk_moments_cuda);
}

}  // namespace bayesvlm_ext
