// CPU kernels for the pairwise logit moments and the streaming top-k (SPEC.md sections 4 and 7);
// argument conventions in ../moments.h.
//
// Both ops walk the [N, M] pair space in tiles. Each tile is one BLAS GEMM (MKL/OpenBLAS through
// at::mm_out, single-threaded inside the parallel region) written straight into its block of the
// output (pairwise_moments) or into a per-thread tile buffer (topk_moments), followed at once by
// the epilogue while the block is still in cache. Tiles run in parallel with at::parallel_for, so
// both cores own whole tiles and never synchronise inside one.
//
// topk_moments splits the queries into blocks and the gallery into segments; each (block,
// segment) task keeps a sorted k-list per query and the segments are merged at the end. Extra
// memory: the per-task tile buffers plus N * k * segments candidates, never [N, M].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../moments.h"
#include "vectorise.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bayesvlm_ext {
namespace {

constexpr int64_t kTileRows = 256;       // pairwise_moments tile: 256 x 512 fp32 = 512 KB, L2-sized
constexpr int64_t kTileCols = 512;
constexpr int64_t kQueryBlock = 256;     // topk_moments: queries per task
constexpr int64_t kGalleryTile = 1024;   // gallery rows per GEMM inside a task
constexpr int64_t kSegmentsPerThread = 4;  // gallery segments per thread, for load balance

// Asks the kernel to back a large, not yet touched output with transparent huge pages where the
// system allows it (THP "madvise" mode): first-touch page faults on [N, M] outputs otherwise cost
// about as much as writing them. Only whole 2 MiB pages inside the buffer are advised; a no-op elsewhere.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = end & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advisory only
#else
  (void)t;
#endif
}

// Per-item scalars of one side, as contiguous columns (stats are [rows, 3] row-major).
template <typename acc_t>
struct SideScalars {
  at::Tensor inv_norm, inv_norm_sq, alpha, quad_plus;  // [rows] each
  // quad_plus = quad + trace_cross * alpha: with it, Var[x.y] = qx ay + ax (qy + tc ay) needs one
  // multiply-add per pair (only the y side uses it; x reads quad from its own column).
  at::Tensor quad;

  SideScalars(const at::Tensor& stats, double trace_cross) {
    inv_norm = stats.select(1, kStatInvNorm).contiguous();
    inv_norm_sq = inv_norm * inv_norm;
    alpha = stats.select(1, kStatAlpha).contiguous();
    quad = stats.select(1, kStatQuad).contiguous();
    quad_plus = (quad + alpha * trace_cross).contiguous();
  }
};

// Scalars of one x row that the epilogue of every pair (i, j) reads.
template <typename acc_t>
struct RowScalars {
  acc_t scaled_inv_norm;     // scale / ||x_i||
  acc_t scaled_inv_norm_sq;  // scale^2 / ||x_i||^2
  acc_t alpha, quad;
};

template <typename acc_t>
RowScalars<acc_t> row_scalars(const SideScalars<acc_t>& x, int64_t i, double scale) {
  const acc_t inv = x.inv_norm.template const_data_ptr<acc_t>()[i];
  return {static_cast<acc_t>(scale) * inv, static_cast<acc_t>(scale * scale) * inv * inv,
          x.alpha.template const_data_ptr<acc_t>()[i], x.quad.template const_data_ptr<acc_t>()[i]};
}

// Column scalars of a y block starting at j0.
template <typename acc_t>
struct ColumnView {
  const acc_t* inv_norm;
  const acc_t* inv_norm_sq;
  const acc_t* alpha;
  const acc_t* quad_plus;

  ColumnView(const SideScalars<acc_t>& y, int64_t j0)
      : inv_norm(y.inv_norm.template const_data_ptr<acc_t>() + j0),
        inv_norm_sq(y.inv_norm_sq.template const_data_ptr<acc_t>() + j0),
        alpha(y.alpha.template const_data_ptr<acc_t>() + j0),
        quad_plus(y.quad_plus.template const_data_ptr<acc_t>() + j0) {}
};

// mean and var of one row of pairs, in place: `mean` holds x_i . y_j on entry, `var` holds
// x_var_i . y_var_j on entry when kHasVar (it is write-only otherwise).
template <typename acc_t, bool kHasVar>
BAYESVLM_EXT_VECTORISE void moments_row(acc_t* __restrict__ mean, acc_t* __restrict__ var, int64_t cols, const RowScalars<acc_t>& r,
                        const ColumnView<acc_t>& c, acc_t bias) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t dot_var = kHasVar ? var[j] : r.quad * c.alpha[j] + r.alpha * c.quad_plus[j];
    mean[j] = r.scaled_inv_norm * c.inv_norm[j] * mean[j] + bias;
    var[j] = r.scaled_inv_norm_sq * c.inv_norm_sq[j] * dot_var;
  }
}

// Per-item scalars of the projected variance (stats columns 3 and 4), as contiguous columns.
template <typename acc_t>
struct ProjectedScalars {
  at::Tensor inv_mu_norm, mu_norm, mu_norm_sq, r;  // [rows] each; 1 / ||mu||, ||mu||, ||mu||^2, u^T S u

  explicit ProjectedScalars(const at::Tensor& stats) {
    if (stats.size(1) < kNumProjectedStats) return;  // no projection: never read
    inv_mu_norm = stats.select(1, kStatInvMuNorm).contiguous();
    mu_norm = inv_mu_norm.reciprocal();
    mu_norm_sq = mu_norm * mu_norm;
    r = stats.select(1, kStatProjQuad).contiguous();
  }
  const acc_t* at(const at::Tensor& t, int64_t i) const { return t.template const_data_ptr<acc_t>() + i; }
};

// The projected numerator of one row of pairs, into `num` (SPEC.md section 4, conventions in moments.h):
// the exact numerator (`num` on entry when kHasVarFeatures, else the Kronecker closed form from the row and
// column scalars) plus cos (cos (r_x ||mu_y||^2 + ||mu_x||^2 r_y) - 2 h), clamped at 0 (NaN stays NaN), with
// h = ||mu_y|| sx_j + ||mu_x|| sy_j from the GEMMs sx = x_proj . y and sy = x . y_proj.
template <typename acc_t, bool kHasVarFeatures>
BAYESVLM_EXT_VECTORISE void projected_row(acc_t* __restrict__ num, const acc_t* __restrict__ dot,
                                          const acc_t* __restrict__ sx, const acc_t* __restrict__ sy, int64_t cols,
                                          const RowScalars<acc_t>& r, const ColumnView<acc_t>& c,
                                          const ProjectedScalars<acc_t>& xp, int64_t i,
                                          const ProjectedScalars<acc_t>& yp, int64_t j0) {
  const acc_t inv_mu_x = *xp.at(xp.inv_mu_norm, i), mu_x = *xp.at(xp.mu_norm, i);
  const acc_t mu_sq_x = *xp.at(xp.mu_norm_sq, i), r_x = *xp.at(xp.r, i);
  const acc_t* inv_mu_y = yp.at(yp.inv_mu_norm, j0);
  const acc_t* mu_y = yp.at(yp.mu_norm, j0);
  const acc_t* mu_sq_y = yp.at(yp.mu_norm_sq, j0);
  const acc_t* r_y = yp.at(yp.r, j0);
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t base = kHasVarFeatures ? num[j] : r.quad * c.alpha[j] + r.alpha * c.quad_plus[j];
    const acc_t cos = dot[j] * inv_mu_x * inv_mu_y[j];
    const acc_t h = mu_y[j] * sx[j] + mu_x * sy[j];
    const acc_t value = base + cos * (cos * (r_x * mu_sq_y[j] + mu_sq_x * r_y[j]) - acc_t(2) * h);
    num[j] = value < acc_t(0) ? acc_t(0) : value;
  }
}

template <typename acc_t>
inline acc_t probit_logit(acc_t mean, acc_t var) {
  return mean / std::sqrt(acc_t(1) + static_cast<acc_t>(kPiOver8) * var);
}

template <typename acc_t>
inline acc_t sigmoid(acc_t t) {
  return acc_t(1) / (acc_t(1) + std::exp(-t));
}

template <typename acc_t, MomentsOutput kOutput>
BAYESVLM_EXT_VECTORISE void transform_row(acc_t* __restrict__ first, const acc_t* __restrict__ var, int64_t cols) {
  if constexpr (kOutput == MomentsOutput::kProbitLogit) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) first[j] = probit_logit(first[j], var[j]);
  } else if constexpr (kOutput == MomentsOutput::kSigmoidProbit) {
    for (int64_t j = 0; j < cols; ++j) first[j] = sigmoid(probit_logit(first[j], var[j]));
  }
}

// Calls fn.template operator()<bool, MomentsOutput>() with the runtime flags as compile-time constants.
template <typename Fn>
void dispatch_moments_variant(bool has_var, int64_t output, Fn&& fn) {
  const auto with_output = [&](auto has_var_c) {
    switch (static_cast<MomentsOutput>(output)) {
      case MomentsOutput::kMean:
        return fn.template operator()<decltype(has_var_c)::value, MomentsOutput::kMean>();
      case MomentsOutput::kProbitLogit:
        return fn.template operator()<decltype(has_var_c)::value, MomentsOutput::kProbitLogit>();
      case MomentsOutput::kSigmoidProbit:
        return fn.template operator()<decltype(has_var_c)::value, MomentsOutput::kSigmoidProbit>();
    }
  };
  if (has_var) {
    with_output(std::true_type{});
  } else {
    with_output(std::false_type{});
  }
}

std::tuple<at::Tensor, at::Tensor> pairwise_moments_cpu(const at::Tensor& x, const at::Tensor& y,
                                                       const at::Tensor& x_stats, const at::Tensor& y_stats,
                                                       const std::optional<at::Tensor>& x_var,
                                                       const std::optional<at::Tensor>& y_var, double scale,
                                                       double bias, double trace_cross, int64_t output,
                                                       const std::optional<at::Tensor>& x_proj,
                                                       const std::optional<at::Tensor>& y_proj) {
  check_pairwise_inputs("pairwise_moments", x, y, x_stats, y_stats, x_var, y_var, x_proj, y_proj);
  check_pairwise_scalars("pairwise_moments", scale, bias, trace_cross);
  check_moments_output(output);
  const auto acc = moments_acc_dtype(x.scalar_type());
  const int64_t n = x.size(0), m = y.size(0);
  at::Tensor first = at::empty({n, m}, x.options().dtype(acc));
  at::Tensor var = at::empty({n, m}, x.options().dtype(acc));
  if (n == 0 || m == 0) return {first, var};
  advise_huge_pages(first);
  advise_huge_pages(var);
  // O((N + M) D) conversions, small beside the [N, M] outputs; no-ops for contiguous acc-dtype input.
  const at::Tensor xa = x.to(acc).contiguous(), ya = y.to(acc).contiguous();
  const bool has_var = x_var.has_value(), projected = x_proj.has_value();
  const at::Tensor xv = has_var ? x_var->contiguous() : at::Tensor();
  const at::Tensor yv = has_var ? y_var->contiguous() : at::Tensor();
  const at::Tensor xp = projected ? x_proj->contiguous() : at::Tensor();
  const at::Tensor yp = projected ? y_proj->contiguous() : at::Tensor();
  const int64_t row_tiles = (n + kTileRows - 1) / kTileRows, col_tiles = (m + kTileCols - 1) / kTileCols;

  AT_DISPATCH_FLOATING_TYPES(acc, "pairwise_moments_cpu", [&] {
    using acc_t = scalar_t;
    const SideScalars<acc_t> xs(x_stats, trace_cross), ys(y_stats, trace_cross);
    const ProjectedScalars<acc_t> xps(x_stats), yps(y_stats);
    // The projected numerator is written into the var output first, then read like var features.
    dispatch_moments_variant(has_var || projected, output, [&]<bool kHasVar, MomentsOutput kOutput>() {
      at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
        // sx = x_proj . y and sy = x . y_proj of the tile (ld = kTileCols)
        at::Tensor sx_tile = projected ? at::empty({kTileRows, kTileCols}, x.options().dtype(acc)) : at::Tensor();
        at::Tensor sy_tile = projected ? at::empty({kTileRows, kTileCols}, x.options().dtype(acc)) : at::Tensor();
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t i0 = (tile / col_tiles) * kTileRows, j0 = (tile % col_tiles) * kTileCols;
          const int64_t rows = std::min(kTileRows, n - i0), cols = std::min(kTileCols, m - j0);
          at::Tensor first_block = first.narrow(0, i0, rows).narrow(1, j0, cols);  // strided view, ld = M
          at::Tensor var_block = var.narrow(0, i0, rows).narrow(1, j0, cols);
          at::mm_out(first_block, xa.narrow(0, i0, rows), ya.narrow(0, j0, cols).t());
          if (has_var) at::mm_out(var_block, xv.narrow(0, i0, rows), yv.narrow(0, j0, cols).t());
          if (projected) {
            at::Tensor sx_block = sx_tile.narrow(0, 0, rows).narrow(1, 0, cols);
            at::Tensor sy_block = sy_tile.narrow(0, 0, rows).narrow(1, 0, cols);
            at::mm_out(sx_block, xp.narrow(0, i0, rows), ya.narrow(0, j0, cols).t());
            at::mm_out(sy_block, xa.narrow(0, i0, rows), yp.narrow(0, j0, cols).t());
          }
          const ColumnView<acc_t> columns(ys, j0);
          acc_t* first_ptr = first.mutable_data_ptr<acc_t>();
          acc_t* var_ptr = var.mutable_data_ptr<acc_t>();
          for (int64_t i = i0; i < i0 + rows; ++i) {
            acc_t* first_row = first_ptr + i * m + j0;
            acc_t* var_row = var_ptr + i * m + j0;
            if (projected) {
              const acc_t* sx_row = sx_tile.const_data_ptr<acc_t>() + (i - i0) * kTileCols;
              const acc_t* sy_row = sy_tile.const_data_ptr<acc_t>() + (i - i0) * kTileCols;
              const RowScalars<acc_t> rs = row_scalars(xs, i, scale);
              if (has_var) {
                projected_row<acc_t, true>(var_row, first_row, sx_row, sy_row, cols, rs, columns, xps, i, yps, j0);
              } else {
                projected_row<acc_t, false>(var_row, first_row, sx_row, sy_row, cols, rs, columns, xps, i, yps, j0);
              }
            }
            moments_row<acc_t, kHasVar>(first_row, var_row, cols, row_scalars(xs, i, scale), columns,
                                        static_cast<acc_t>(bias));
            transform_row<acc_t, kOutput>(first_row, var_row, cols);
          }
        }
      });
    });
  });
  return {first, var};
}

// ---- streaming top-k ------------------------------------------------------------------------------

// The top-k order of SPEC.md section 12: a NaN score ranks after every other score (-inf included),
// so the order is total and a query always gets k rows; callers break ties by the lower index.
template <typename acc_t>
inline bool scores_before(acc_t a, acc_t b) {
  return !std::isnan(a) && (std::isnan(b) || a > b);
}

// The k best (score, index) of one query so far, sorted by scores_before, ties by lower index. Items
// arrive in increasing index order within a task, so a newcomer equal to an entry ranks after it.
template <typename acc_t>
struct TopkList {
  acc_t* value;
  int64_t* index;
  acc_t* mean;
  acc_t* var;
  int64_t k;
  int64_t count = 0;
  // Scores above `threshold` enter; while `open` (list not full, or its last entry NaN) every item is
  // offered and `offer` decides, so NaN and -inf scores still fill a list that has room.
  acc_t threshold = -std::numeric_limits<acc_t>::infinity();
  bool open = true;

  void offer(acc_t v, int64_t idx, acc_t mu, acc_t sigma2) {
    if (count == k && !scores_before(v, value[k - 1])) return;
    int64_t pos = count < k ? count++ : k - 1;  // the slot freed at the end
    while (pos > 0 && scores_before(v, value[pos - 1])) {
      value[pos] = value[pos - 1];
      index[pos] = index[pos - 1];
      mean[pos] = mean[pos - 1];
      var[pos] = var[pos - 1];
      --pos;
    }
    value[pos] = v;
    index[pos] = idx;
    mean[pos] = mu;
    var[pos] = sigma2;
    open = count < k || std::isnan(value[k - 1]);
    threshold = open ? -std::numeric_limits<acc_t>::infinity() : value[k - 1];
  }
};

// Score of one row of pairs from its moments (mean, var), into `score`.
template <typename acc_t, TopkScore kScore>
BAYESVLM_EXT_VECTORISE void score_row(acc_t* __restrict__ score, const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                      int64_t cols, acc_t kappa) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    if constexpr (kScore == TopkScore::kMean) {
      score[j] = mean[j];
    } else if constexpr (kScore == TopkScore::kPessimistic) {
      score[j] = mean[j] - kappa * std::sqrt(var[j]);
    } else if constexpr (kScore == TopkScore::kOptimistic) {
      score[j] = mean[j] + kappa * std::sqrt(var[j]);
    } else {
      score[j] = probit_logit(mean[j], var[j]);
    }
  }
}

template <typename Fn>
void dispatch_topk_variant(bool has_var, int64_t score, Fn&& fn) {
  const auto with_score = [&](auto has_var_c) {
    constexpr bool kHasVar = decltype(has_var_c)::value;
    switch (static_cast<TopkScore>(score)) {
      case TopkScore::kMean:
        return fn.template operator()<kHasVar, TopkScore::kMean>();
      case TopkScore::kPessimistic:
        return fn.template operator()<kHasVar, TopkScore::kPessimistic>();
      case TopkScore::kOptimistic:
        return fn.template operator()<kHasVar, TopkScore::kOptimistic>();
      case TopkScore::kProbit:
        return fn.template operator()<kHasVar, TopkScore::kProbit>();
    }
  };
  if (has_var) {
    with_score(std::true_type{});
  } else {
    with_score(std::false_type{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_moments_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_stats, const at::Tensor& y_stats,
    const std::optional<at::Tensor>& x_var, const std::optional<at::Tensor>& y_var, double scale, double bias,
    double trace_cross, int64_t k, int64_t score, double kappa, const std::optional<at::Tensor>& x_proj,
    const std::optional<at::Tensor>& y_proj) {
  check_pairwise_inputs("topk_moments", x, y, x_stats, y_stats, x_var, y_var, x_proj, y_proj);
  check_pairwise_scalars("topk_moments", scale, bias, trace_cross);
  check_topk_args(k, y.size(0), score, kappa);
  const auto acc = moments_acc_dtype(x.scalar_type());
  const int64_t n = x.size(0), m = y.size(0);
  const auto acc_options = x.options().dtype(acc);
  at::Tensor values = at::empty({n, k}, acc_options), mean = at::empty({n, k}, acc_options);
  at::Tensor var = at::empty({n, k}, acc_options);
  at::Tensor indices = at::empty({n, k}, x.options().dtype(at::kLong));
  if (n == 0 || k == 0) return {values, indices, mean, var};

  const bool has_var = x_var.has_value(), projected = x_proj.has_value();
  const at::Tensor xa = x.to(acc).contiguous();  // queries: O(N D), the caller's own size
  const at::Tensor xv = has_var ? x_var->contiguous() : at::Tensor();
  const at::Tensor yv = has_var ? y_var->contiguous() : at::Tensor();  // the gallery's stored features
  const at::Tensor xp = projected ? x_proj->contiguous() : at::Tensor();
  const at::Tensor yp = projected ? y_proj->contiguous() : at::Tensor();
  const bool convert_gallery = y.scalar_type() != acc;  // converted tile by tile, never as a whole

  const int64_t query_blocks = (n + kQueryBlock - 1) / kQueryBlock;
  const int64_t gallery_tiles = (m + kGalleryTile - 1) / kGalleryTile;
  const int64_t wanted = std::max<int64_t>(1, at::get_num_threads() * kSegmentsPerThread / query_blocks);
  const int64_t segments = std::min(gallery_tiles, wanted);
  const int64_t tiles_per_segment = (gallery_tiles + segments - 1) / segments;
  // Candidates per (query, segment): k slots each; a segment with fewer than k items leaves count < k.
  at::Tensor cand_value = at::empty({segments, n, k}, acc_options), cand_mean = at::empty({segments, n, k}, acc_options);
  at::Tensor cand_var = at::empty({segments, n, k}, acc_options);
  at::Tensor cand_index = at::empty({segments, n, k}, x.options().dtype(at::kLong));
  std::vector<int64_t> cand_count(static_cast<size_t>(segments * n), 0);

  AT_DISPATCH_FLOATING_TYPES(acc, "topk_moments_cpu", [&] {
    using acc_t = scalar_t;
    const SideScalars<acc_t> xs(x_stats, trace_cross), ys(y_stats, trace_cross);
    const ProjectedScalars<acc_t> xps(x_stats), yps(y_stats);
    // The projected numerator fills the var-features buffer, then is read like var features.
    dispatch_topk_variant(has_var || projected, score, [&]<bool kHasVar, TopkScore kScore>() {
      at::parallel_for(0, query_blocks * segments, 1, [&](int64_t begin, int64_t end) {
        at::Tensor dots = at::empty({kQueryBlock, kGalleryTile}, acc_options);  // the tile buffer
        at::Tensor dot_vars = at::empty({kHasVar ? kQueryBlock : 0, kGalleryTile}, acc_options);
        at::Tensor sxs = at::empty({projected ? kQueryBlock : 0, kGalleryTile}, acc_options);  // x_proj . y
        at::Tensor sys = at::empty({projected ? kQueryBlock : 0, kGalleryTile}, acc_options);  // x . y_proj
        std::vector<acc_t> row_score(kGalleryTile), row_var(kGalleryTile);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t block = task / segments, segment = task % segments;
          const int64_t q0 = block * kQueryBlock, queries = std::min(kQueryBlock, n - q0);
          const int64_t g_begin = segment * tiles_per_segment * kGalleryTile;
          const int64_t g_end = std::min(m, g_begin + tiles_per_segment * kGalleryTile);
          const int64_t slot0 = segment * n * k;
          std::vector<TopkList<acc_t>> lists;
          lists.reserve(queries);
          for (int64_t q = q0; q < q0 + queries; ++q) {
            const int64_t offset = slot0 + q * k;
            lists.push_back({cand_value.mutable_data_ptr<acc_t>() + offset,
                             cand_index.mutable_data_ptr<int64_t>() + offset,
                             cand_mean.mutable_data_ptr<acc_t>() + offset, cand_var.mutable_data_ptr<acc_t>() + offset,
                             k});
          }
          const at::Tensor xq = xa.narrow(0, q0, queries);
          for (int64_t g0 = g_begin; g0 < g_end; g0 += kGalleryTile) {
            const int64_t cols = std::min(kGalleryTile, g_end - g0);
            at::Tensor tile = y.narrow(0, g0, cols);
            if (convert_gallery) tile = tile.to(acc);
            at::Tensor dot_block = dots.narrow(0, 0, queries).narrow(1, 0, cols);
            at::mm_out(dot_block, xq, tile.t());
            if (has_var) {
              at::Tensor dot_var_block = dot_vars.narrow(0, 0, queries).narrow(1, 0, cols);
              at::mm_out(dot_var_block, xv.narrow(0, q0, queries), yv.narrow(0, g0, cols).t());
            }
            if (projected) {
              at::Tensor sx_block = sxs.narrow(0, 0, queries).narrow(1, 0, cols);
              at::Tensor sy_block = sys.narrow(0, 0, queries).narrow(1, 0, cols);
              at::mm_out(sx_block, xp.narrow(0, q0, queries), tile.t());
              at::mm_out(sy_block, xq, yp.narrow(0, g0, cols).t());
            }
            const ColumnView<acc_t> columns(ys, g0);
            for (int64_t r = 0; r < queries; ++r) {
              acc_t* row_mean = dots.mutable_data_ptr<acc_t>() + r * kGalleryTile;  // dots -> means in place
              acc_t* row_dot_var = kHasVar ? dot_vars.mutable_data_ptr<acc_t>() + r * kGalleryTile : nullptr;
              acc_t* row_v = kHasVar ? row_dot_var : row_var.data();
              if (projected) {
                const acc_t* sx_row = sxs.const_data_ptr<acc_t>() + r * kGalleryTile;
                const acc_t* sy_row = sys.const_data_ptr<acc_t>() + r * kGalleryTile;
                const RowScalars<acc_t> rs = row_scalars(xs, q0 + r, scale);
                if (has_var) {
                  projected_row<acc_t, true>(row_v, row_mean, sx_row, sy_row, cols, rs, columns, xps, q0 + r, yps, g0);
                } else {
                  projected_row<acc_t, false>(row_v, row_mean, sx_row, sy_row, cols, rs, columns, xps, q0 + r, yps,
                                              g0);
                }
              }
              moments_row<acc_t, kHasVar>(row_mean, row_v, cols, row_scalars(xs, q0 + r, scale), columns,
                                          static_cast<acc_t>(bias));
              score_row<acc_t, kScore>(row_score.data(), row_mean, row_v, cols, static_cast<acc_t>(kappa));
              TopkList<acc_t>& list = lists[r];
              for (int64_t j = 0; j < cols; ++j) {
                // A NaN fails the comparison: it enters only while the list is open.
                if (row_score[j] > list.threshold || list.open) list.offer(row_score[j], g0 + j, row_mean[j], row_v[j]);
              }
            }
          }
          for (int64_t r = 0; r < queries; ++r) cand_count[segment * n + q0 + r] = lists[r].count;
        }
      });

      // Merge the segments' lists per query. Segments cover increasing index ranges, so a stable
      // sort by scores_before over the concatenation (segment order) keeps ties in index order.
      const acc_t* cv = cand_value.const_data_ptr<acc_t>();
      const int64_t* ci = cand_index.const_data_ptr<int64_t>();
      const acc_t* cm = cand_mean.const_data_ptr<acc_t>();
      const acc_t* cs = cand_var.const_data_ptr<acc_t>();
      acc_t* out_value = values.mutable_data_ptr<acc_t>();
      int64_t* out_index = indices.mutable_data_ptr<int64_t>();
      acc_t* out_mean = mean.mutable_data_ptr<acc_t>();
      acc_t* out_var = var.mutable_data_ptr<acc_t>();
      at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> order;
        for (int64_t q = begin; q < end; ++q) {
          order.clear();
          for (int64_t s = 0; s < segments; ++s) {
            for (int64_t c = 0; c < cand_count[s * n + q]; ++c) order.push_back((s * n + q) * k + c);
          }
          // Each segment holds min(k, its rows) candidates and the segments cover all M >= k rows.
          TORCH_CHECK(static_cast<int64_t>(order.size()) >= k, "topk_moments: internal error, ", order.size(),
                      " candidates for k = ", k);
          std::stable_sort(order.begin(), order.end(),
                           [&](int64_t a, int64_t b) { return scores_before(cv[a], cv[b]); });
          for (int64_t c = 0; c < k; ++c) {
            const int64_t src = order[c];
            const acc_t t = cv[src];
            out_value[q * k + c] = kScore == TopkScore::kProbit ? sigmoid(t) : t;
            out_index[q * k + c] = ci[src];
            out_mean[q * k + c] = cm[src];
            out_var[q * k + c] = cs[src];
          }
        }
      });
    });
  });
  return {values, indices, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayesvlm_ext, CPU, m) {
  m.impl("pairwise_moments", &pairwise_moments_cpu);
  m.impl("topk_moments", &topk_moments_cpu);
}

}  // namespace bayesvlm_ext
