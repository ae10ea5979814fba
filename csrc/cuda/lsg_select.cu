// CUDA kernel for the fused LSG "norm" selection (semantics: csrc/lsg_select.cpp). Torch-free on
// purpose (see the header).
//
// One thread block per (b, h, chunk), striding over all B*H*num_chunks of them:
//   1. scores: each warp takes 32 positions; it stages their k rows through shared memory 32
//      columns at a time (coalesced loads), then each lane sums its own row left to right with
//      __fmul_rn / __fadd_rn (never contracted into an FMA), so the bits equal the CPU kernel's
//      and the torch path's. Masked positions and positions >= T score -1.
//   2. ranks: thread i counts the positions that rank before position i (score descending, NaN
//      first, ties by position) -- O(chunk^2 / threads) shared-memory reads, stopping at `keep`;
//      rank r < keep goes to slot keep-1-r (ascending score).
//   3. gather: the block copies the `keep` selected k and v rows (raw bits, coalesced over D)
//      and writes their positions to index (-1 past T).
//
// Builds under torch's default nvcc flags (__CUDA_NO_HALF_OPERATORS__, __CUDA_NO_HALF_CONVERSIONS__,
// __CUDA_NO_BFLOAT16_CONVERSIONS__): fp16 / bf16 values are read as bits and converted with
// the explicit intrinsics only.

#include "lsg_select.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lhattn {
namespace cuda {
namespace {

constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Element traits: the storage bits, the accumulation type, and bits -> acc.
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  using bits = uint16_t;
  using acc = float;
  static constexpr int kWarps = 8;
  __device__ static float to_acc(uint16_t b) { return __half2float(__ushort_as_half(b)); }
};

template <>
struct Elem<__nv_bfloat16> {
  using bits = uint16_t;
  using acc = float;
  static constexpr int kWarps = 8;
  __device__ static float to_acc(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
};

template <>
struct Elem<float> {
  using bits = uint32_t;
  using acc = float;
  static constexpr int kWarps = 8;
  __device__ static float to_acc(uint32_t b) { return __uint_as_float(b); }
};

template <>
struct Elem<double> {
  using bits = uint64_t;
  using acc = double;
  static constexpr int kWarps = 4;  // keeps the double-width tile within 48 KiB of shared memory
  __device__ static double to_acc(uint64_t b) { return __longlong_as_double(static_cast<long long>(b)); }
};

// Round-to-nearest products and sums that the compiler may not fuse into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename A>
__device__ __forceinline__ bool is_nan(A x) {
  return x != x;
}

// Whether position j (score sj) ranks before position i (score si): the op's strict total order.
template <typename A>
__device__ __forceinline__ bool ranks_before(A sj, int j, A si, int i) {
  const bool nj = is_nan(sj), ni = is_nan(si);
  if (nj || ni) return (nj && ni) ? j < i : nj;
  return sj > si || (sj == si && j < i);
}

template <typename T>
__global__ void __launch_bounds__(Elem<T>::kWarps * 32)
    lsg_norm_select_kernel(const LsgNormSelectArgs args) {
  using Bits = typename Elem<T>::bits;
  using acc_t = typename Elem<T>::acc;
  constexpr int kWarps = Elem<T>::kWarps;
  __shared__ acc_t s_score[kLsgNormMaxChunk];   // [chunk]
  __shared__ int s_sel[kLsgNormMaxChunk];       // [keep]: slot -> position within the chunk
  __shared__ Bits s_tile[kWarps][32][33];       // per warp: 32 rows x 32 columns of k (+1: banks)

  const Bits* __restrict__ k = static_cast<const Bits*>(args.k);
  const Bits* __restrict__ v = static_cast<const Bits*>(args.v);
  Bits* __restrict__ k_out = static_cast<Bits*>(args.k_out);
  Bits* __restrict__ v_out = static_cast<Bits*>(args.v_out);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int chunk = static_cast<int>(args.chunk);
  const int keep = static_cast<int>(args.keep);
  const int64_t rows_out = args.num_chunks * keep;  // M
  const int64_t total = args.batch * args.heads * args.num_chunks;

  for (int64_t task = blockIdx.x; task < total; task += gridDim.x) {
    const int64_t c = task % args.num_chunks;
    const int64_t bh = task / args.num_chunks;
    const int64_t h = bh % args.heads;
    const int64_t b = bh / args.heads;
    const int64_t p0 = c * chunk;  // first position of the chunk
    const Bits* k_bh = k + b * args.k_stride_b + h * args.k_stride_h;
    const Bits* v_bh = v + b * args.v_stride_b + h * args.v_stride_h;

    // ---- 1. scores ----------------------------------------------------------------------
    for (int base = warp * 32; base < chunk; base += kWarps * 32) {
      const int j = base + lane;
      const int64_t p = p0 + j;
      const bool live = j < chunk && p < args.tokens;
      acc_t s = acc_t(0);
      for (int64_t d0 = 0; d0 < args.dim; d0 += 32) {
        const int64_t d = d0 + lane;
        if (d < args.dim) {
#pragma unroll 8
          for (int r = 0; r < 32; ++r) {  // row base + r, column d: lanes read one row together
            const int64_t pr = p0 + base + r;
            if (base + r < chunk && pr < args.tokens) {
              s_tile[warp][r][lane] = k_bh[pr * args.k_stride_t + d * args.k_stride_d];
            }
          }
        }
        __syncwarp();
        if (live) {
          const int cols = static_cast<int>(args.dim - d0 < 32 ? args.dim - d0 : 32);
#pragma unroll 8
          for (int cc = 0; cc < cols; ++cc) {
            const acc_t x = Elem<T>::to_acc(s_tile[warp][lane][cc]);
            s = add_rn(s, mul_rn(x, x));
          }
        }
        __syncwarp();
      }
      if (j < chunk) {
        const bool masked =
            !live || (args.mask != nullptr && args.mask[b * args.mask_stride_b + p * args.mask_stride_t] != 0);
        s_score[j] = masked ? acc_t(-1) : s;
      }
    }
    __syncthreads();

    // ---- 2. ranks -----------------------------------------------------------------------
    for (int i = threadIdx.x; i < chunk; i += blockDim.x) {
      const acc_t si = s_score[i];
      int rank = 0;
      for (int j = 0; j < chunk && rank < keep; ++j) rank += ranks_before(s_score[j], j, si, i) ? 1 : 0;
      if (rank < keep) s_sel[keep - 1 - rank] = i;
    }
    __syncthreads();

    // ---- 3. index and gather ------------------------------------------------------------
    const int64_t m0 = bh * rows_out + c * keep;  // first output row of this chunk
    for (int r = threadIdx.x; r < keep; r += blockDim.x) {
      const int64_t p = p0 + s_sel[r];
      args.index_out[m0 + r] = p < args.tokens ? p : -1;
    }
    const int64_t k_elems = static_cast<int64_t>(keep) * args.dim;
    for (int64_t e = threadIdx.x; e < k_elems; e += blockDim.x) {
      const int64_t r = e / args.dim, d = e - r * args.dim;
      const int64_t p = p0 + s_sel[r];
      k_out[(m0 + r) * args.dim + d] =
          p < args.tokens ? k_bh[p * args.k_stride_t + d * args.k_stride_d] : Bits(0);
    }
    const int64_t v_elems = static_cast<int64_t>(keep) * args.dim_v;
    for (int64_t e = threadIdx.x; e < v_elems; e += blockDim.x) {
      const int64_t r = e / args.dim_v, d = e - r * args.dim_v;
      const int64_t p = p0 + s_sel[r];
      v_out[(m0 + r) * args.dim_v + d] =
          p < args.tokens ? v_bh[p * args.v_stride_t + d * args.v_stride_d] : Bits(0);
    }
    __syncthreads();  // s_score / s_sel are reused by the next task
  }
}

template <typename T>
cudaError_t lsg_norm_select_impl(const LsgNormSelectArgs& args, cudaStream_t stream) {
  const int64_t total = args.batch * args.heads * args.num_chunks;
  const int64_t blocks = total < kMaxBlocks ? total : kMaxBlocks;
  lsg_norm_select_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(Elem<T>::kWarps * 32), 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lsg_norm_select(const LsgNormSelectArgs& args, DType dtype, cudaStream_t stream) {
  if (args.chunk < 1 || args.chunk > kLsgNormMaxChunk || args.keep < 1 || args.keep > args.chunk ||
      args.num_chunks < 0 || args.num_chunks * args.chunk < args.tokens) {
    return cudaErrorInvalidValue;
  }
  if (args.batch * args.heads * args.num_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return lsg_norm_select_impl<__half>(args, stream);
    case DType::kBFloat16:
      return lsg_norm_select_impl<__nv_bfloat16>(args, stream);
    case DType::kFloat32:
      return lsg_norm_select_impl<float>(args, stream);
    case DType::kFloat64:
      return lsg_norm_select_impl<double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lhattn
