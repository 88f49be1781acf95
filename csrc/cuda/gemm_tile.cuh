// Block-tile GEMM machinery of the fused pairwise kernels (pairwise_moments.cu).
//
// One block of kThreads = 128 threads (4 warps) computes one kTile x kTile = 64 x 64 tile
//   C[r, c] = sum_k A[row0_a + r, k] * B[row0_b + c, k]
// of two operands stored as rows (x [N, D] and y [M, D]: any strides, rows past the end and
// k past the depth read as zero). K is walked in slabs of kSlab = 32: every thread loads its share
// of the next slab into registers (16-byte vector loads when the rows are contiguous and aligned,
// strided scalar loads otherwise) while the warps multiply the slab already in shared memory, so
// the single shared staging buffer costs two __syncthreads() per slab and no double buffer.
//
// The math is a compile-time policy; all three share the staging loader and the result layout
// (an acc_t [kTile][kAccLd] row-major tile in shared memory, read by the epilogues):
//   Wmma16Math<half|bf16>  tensor cores, wmma m16n16k16, fp32 accumulate; warp w owns the 32 x 32
//                          quarter (w / 2, w % 2) as 2 x 2 fragments; staged row-major [64][40].
//   Tf32Math               tensor cores on fp32 data, wmma m16n16k8 tf32 (rounded to tf32 once,
//                          when staged), fp32 accumulate; same warp layout, staged [64][36].
//   SimtMath<float|double> CUDA-core FMA; thread t owns rows 8 (t / 16) + [0, 8) and columns
//                          4 (t % 16) + [0, 4); staged K-major [32][64 + pad] so that both
//                          operand fragments are contiguous vector loads from shared memory.
// The paddings keep wmma's 32-byte fragment alignment and spread shared-memory banks.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace bayesvlm_ext::gemm_tile {

constexpr int kTile = 64;                 // rows of A and of B in one tile
constexpr int kSlab = 32;                 // depth of one staged slab
constexpr int kThreads = 128;             // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kAccLd = kTile + 4;         // row stride of the result tile in shared memory

// A row-stored operand: element (r, k) at ptr[r * row_stride + k * col_stride], rows x cols.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t rows, cols, row_stride, col_stride;
  bool vec;  // 16-byte loads allowed: unit column stride and 16-byte aligned rows
};

template <typename T>
__device__ inline Operand<T> make_operand(const void* ptr, int64_t rows, int64_t cols, int64_t row_stride,
                                          int64_t col_stride) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec =
      col_stride == 1 && row_stride % kVec == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  return {static_cast<const T*>(ptr), rows, cols, row_stride, col_stride, vec};
}

// ---- math policies ---------------------------------------------------------------------------

// bf16 and tf32 wmma exist from sm_80 on. Device passes for older GPUs see stubs of the two tensor-core
// policies (only what host-side code names); the kernels built on them compile to a trap there, and
// the host refuses such devices.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define BAYESVLM_EXT_HAS_WMMA 1
#endif

#ifdef BAYESVLM_EXT_HAS_WMMA

// The warp layout both tensor-core policies share: warp w owns the 32 x 32 quarter (w / 2, w % 2)
// of the tile as 2 x 2 wmma fragments of 16 x 16, in K steps of kK. `precision_t` is the fragment
// element type (__half, __nv_bfloat16 or wmma::precision::tf32), `load_t` what shared memory holds.
template <typename precision_t, typename load_t, int kK, int kLd>
struct WmmaWarpTiles {
  struct Acc {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float> f[2][2];
  };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc.f[i][j], 0.0f);
  }

  template <typename smem_t>
  __device__ static void mma(Acc& acc, const smem_t* sa, const smem_t* sb) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const auto* a = reinterpret_cast<const load_t*>(sa) + (warp / 2) * 32 * kLd;
    const auto* b = reinterpret_cast<const load_t*>(sb) + (warp % 2) * 32 * kLd;
#pragma unroll
    for (int kk = 0; kk < kSlab; kk += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, precision_t, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, kK, precision_t, wmma::col_major> fb[2];  // B[k][n] = y[n][k]
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a + i * 16 * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + j * 16 * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.f[i][j], fa[i], fb[j], acc.f[i][j]);
    }
  }

  __device__ static void store(const Acc& acc, float* tile) {
    const int warp = threadIdx.x / 32;
    float* base = tile + (warp / 2) * 32 * kAccLd + (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(base + i * 16 * kAccLd + j * 16, acc.f[i][j], kAccLd,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <typename scalar_t>
using half_or_bf16_t = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, __half, __nv_bfloat16>;

template <typename scalar_t>
struct Wmma16Math : WmmaWarpTiles<half_or_bf16_t<scalar_t>, half_or_bf16_t<scalar_t>, 16, kSlab + 8> {
  static_assert(std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>);
  using smem_t = scalar_t;  // same bits as __half / __nv_bfloat16
  static constexpr int kLd = kSlab + 8;
  static constexpr int kOperandElems = kTile * kLd;
  static constexpr bool kRawStore = true;  // staged as loaded: 16-byte chunks copy straight through

  __device__ static int offset(int row, int k) { return row * kLd + k; }
  __device__ static smem_t convert(scalar_t v) { return v; }
};

struct Tf32Math : WmmaWarpTiles<nvcuda::wmma::precision::tf32, float, 8, kSlab + 4> {
  using smem_t = float;
  static constexpr int kLd = kSlab + 4;
  static constexpr int kOperandElems = kTile * kLd;
  static constexpr bool kRawStore = false;

  __device__ static int offset(int row, int k) { return row * kLd + k; }
  // Rounded once when staged, so the fragments need no per-load conversion.
  __device__ static smem_t convert(float v) { return nvcuda::wmma::__float_to_tf32(v); }
};

#else

template <typename scalar_t>
struct Wmma16Math {
  using smem_t = scalar_t;
  static constexpr int kOperandElems = 0;
};
struct Tf32Math {
  using smem_t = float;
  static constexpr int kOperandElems = 0;
};

#endif  // BAYESVLM_EXT_HAS_WMMA

// n contiguous values from 16-byte aligned shared memory, as float4 / double2 loads or stores.
template <int kN, typename T>
__device__ inline void load_vec(const T* src, T (&dst)[kN]) {
  using vec_t = std::conditional_t<std::is_same_v<T, float>, float4, double2>;
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < kN / kPer; ++v) {
    const vec_t q = reinterpret_cast<const vec_t*>(src)[v];
    if constexpr (kPer == 4) {
      dst[4 * v] = q.x, dst[4 * v + 1] = q.y, dst[4 * v + 2] = q.z, dst[4 * v + 3] = q.w;
    } else {
      dst[2 * v] = q.x, dst[2 * v + 1] = q.y;
    }
  }
}

template <int kN, typename T>
__device__ inline void store_vec(T* dst, const T (&src)[kN]) {
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < kN / kPer; ++v) {
    if constexpr (kPer == 4) {
      reinterpret_cast<float4*>(dst)[v] = make_float4(src[4 * v], src[4 * v + 1], src[4 * v + 2], src[4 * v + 3]);
    } else {
      reinterpret_cast<double2*>(dst)[v] = make_double2(src[2 * v], src[2 * v + 1]);
    }
  }
}

template <typename acc_t>
struct SimtMath {
  static_assert(std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>);
  using smem_t = acc_t;
  static constexpr int kLd = kTile + 16 / static_cast<int>(sizeof(acc_t));  // keeps rows 16-byte aligned
  static constexpr int kOperandElems = kSlab * kLd;
  static constexpr bool kRawStore = false;
  static constexpr int kRowsPerThread = 8, kColsPerThread = 4;  // 8 x 16 threads cover 64 x 64

  __device__ static int offset(int row, int k) { return k * kLd + row; }
  template <typename in_t>
  __device__ static smem_t convert(in_t v) {
    return static_cast<acc_t>(v);
  }

  struct Acc {
    acc_t c[kRowsPerThread][kColsPerThread];
  };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc.c[i][j] = acc_t(0);
  }

  __device__ static void mma(Acc& acc, const smem_t* sa, const smem_t* sb) {
    const int row0 = (threadIdx.x / 16) * kRowsPerThread;
    const int col0 = (threadIdx.x % 16) * kColsPerThread;
#pragma unroll 8
    for (int kk = 0; kk < kSlab; ++kk) {
      acc_t a[kRowsPerThread], b[kColsPerThread];
      load_vec(sa + kk * kLd + row0, a);
      load_vec(sb + kk * kLd + col0, b);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) acc.c[i][j] += a[i] * b[j];
    }
  }

  __device__ static void store(const Acc& acc, acc_t* tile) {
    const int row0 = (threadIdx.x / 16) * kRowsPerThread;
    const int col0 = (threadIdx.x % 16) * kColsPerThread;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) store_vec(tile + (row0 + i) * kAccLd + col0, acc.c[i]);
  }
};

// ---- staging ---------------------------------------------------------------------------------

// One thread's share of a [kTile, kSlab] slab: kChunks runs of kVec consecutive k (16 bytes each).
template <typename in_t, class Math>
struct SlabLoader {
  static constexpr int kVec = 16 / sizeof(in_t);
  static constexpr int kChunksPerRow = kSlab / kVec;
  static constexpr int kChunks = kTile * kChunksPerRow / kThreads;
  static_assert(kTile * kChunksPerRow % kThreads == 0);

  alignas(16) in_t buf[kChunks][kVec];

  __device__ void load(const Operand<in_t>& op, int64_t row0, int64_t k0) {
    // Opaque to the optimiser, so that it recomputes the addresses per slab instead of hoisting all
    // kChunks * kVec strided addresses out of the K loop into registers (~100 more per thread).
    int64_t row_stride = op.row_stride, col_stride = op.col_stride;
    asm volatile("" : "+l"(row_stride), "+l"(col_stride));
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int chunk = threadIdx.x + i * kThreads;
      const int64_t row = row0 + chunk / kChunksPerRow;
      const int64_t k = k0 + (chunk % kChunksPerRow) * kVec;
      if (op.vec && row < op.rows && k + kVec <= op.cols) {
        *reinterpret_cast<uint4*>(buf[i]) = *reinterpret_cast<const uint4*>(op.ptr + row * row_stride + k);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          buf[i][e] = (row < op.rows && k + e < op.cols) ? op.ptr[row * row_stride + (k + e) * col_stride]
                                                         : static_cast<in_t>(0.0f);
        }
      }
    }
  }

  __device__ void store(typename Math::smem_t* slab) const {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int chunk = threadIdx.x + i * kThreads;
      const int row = chunk / kChunksPerRow;
      const int k = (chunk % kChunksPerRow) * kVec;
      if constexpr (Math::kRawStore) {
        *reinterpret_cast<uint4*>(slab + Math::offset(row, k)) = *reinterpret_cast<const uint4*>(buf[i]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) slab[Math::offset(row, k + e)] = Math::convert(buf[i][e]);
      }
    }
  }
};

// acc = A[row0_a + [0, 64)] . B[row0_b + [0, 64)]^T over the whole depth a.cols (= b.cols), staged
// through sa / sb (Math::kOperandElems each). The first slab is written without a barrier: the
// caller makes sure no thread still reads sa / sb. Ends with __syncthreads() whenever the depth is
// positive, after which the staging memory may be reused.
template <class Math, typename in_t>
__device__ void gemm_tile(typename Math::Acc& acc, const Operand<in_t>& a, int64_t row0_a, const Operand<in_t>& b,
                          int64_t row0_b, typename Math::smem_t* sa, typename Math::smem_t* sb) {
  Math::zero(acc);
  const int64_t depth = a.cols;
  if (depth <= 0) return;
  SlabLoader<in_t, Math> load_a, load_b;
  load_a.load(a, row0_a, 0);
  load_b.load(b, row0_b, 0);
  for (int64_t k0 = 0; k0 < depth; k0 += kSlab) {
    load_a.store(sa);
    load_b.store(sb);
    __syncthreads();
    if (k0 + kSlab < depth) {  // prefetch the next slab while this one is multiplied
      load_a.load(a, row0_a, k0 + kSlab);
      load_b.load(b, row0_b, k0 + kSlab);
    }
    Math::mma(acc, sa, sb);
    __syncthreads();
  }
}

}  // namespace bayesvlm_ext::gemm_tile
