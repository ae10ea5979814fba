// CUDA kernels for the row gather / scatter-add ops. Torch-free on purpose (see the header).
//
// Layout of a launch: a block is (threads_d, rows_per_block) threads; threadIdx.y picks a row,
// threadIdx.x walks the row's D elements, so reads and writes of one row are coalesced.
// Blocks stride over all B*H*M rows, so any size fits the grid. Offsets are int64.
//
// The code builds under torch's default nvcc flags (__CUDA_NO_HALF_OPERATORS__,
// __CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_BFLOAT16_CONVERSIONS__): fp16 / bf16 values are
// converted with the explicit intrinsics only.

#include "gather_scatter.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lhattn {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

struct LaunchShape {
  dim3 grid;
  dim3 block;
};

LaunchShape launch_shape(int64_t total_rows, int64_t dim) {
  int threads_d = 32;
  while (threads_d < dim && threads_d < kThreadsPerBlock) threads_d *= 2;
  const int rows_per_block = kThreadsPerBlock / threads_d;
  int64_t blocks = (total_rows + rows_per_block - 1) / rows_per_block;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return {dim3(static_cast<unsigned>(blocks)), dim3(threads_d, rows_per_block)};
}

// ---- atomics --------------------------------------------------------------------------------

__device__ __forceinline__ void atomic_add(float* address, float value) { atomicAdd(address, value); }

__device__ __forceinline__ void atomic_add(double* address, double value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  auto* word = reinterpret_cast<unsigned long long*>(address);
  unsigned long long old = *word, assumed;
  do {
    assumed = old;
    old = atomicCAS(word, assumed,
                    __double_as_longlong(__longlong_as_double(assumed) + value));
  } while (assumed != old);
#else
  atomicAdd(address, value);
#endif
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
// Fallback for 16-bit floats on archs without a native atomicAdd for them (fp16 < sm_70,
// bf16 < sm_80): CAS on the aligned 32-bit word that holds the value, summing in fp32.
template <typename Half16>
struct Half16Bits;
#if __CUDA_ARCH__ < 700
template <>
struct Half16Bits<__half> {
  __device__ static float to_float(unsigned short bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ static unsigned short from_float(float value) {
    return __half_as_ushort(__float2half_rn(value));
  }
};
#endif  // __CUDA_ARCH__ < 700
template <>
struct Half16Bits<__nv_bfloat16> {
  __device__ static float to_float(unsigned short bits) {
    return __uint_as_float(static_cast<unsigned int>(bits) << 16);
  }
  __device__ static unsigned short from_float(float value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(value));
  }
};

template <typename Half16>
__device__ __forceinline__ void atomic_add_half16_cas(Half16* address, float value) {
  const auto addr = reinterpret_cast<uintptr_t>(address);
  auto* word = reinterpret_cast<unsigned int*>(addr & ~uintptr_t(3));
  const unsigned int shift = (addr & 2) ? 16u : 0u;
  unsigned int old = *word, assumed;
  do {
    assumed = old;
    const auto bits = static_cast<unsigned short>((assumed >> shift) & 0xffffu);
    const unsigned short sum = Half16Bits<Half16>::from_float(Half16Bits<Half16>::to_float(bits) + value);
    const unsigned int updated = (assumed & ~(0xffffu << shift)) | (static_cast<unsigned int>(sum) << shift);
    old = atomicCAS(word, assumed, updated);
  } while (assumed != old);
}
#endif  // __CUDA_ARCH__ < 800

__device__ __forceinline__ void atomic_add(__half* address, __half value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
  atomic_add_half16_cas(address, __half2float(value));
#else
  atomicAdd(address, value);
#endif
}

__device__ __forceinline__ void atomic_add(__nv_bfloat16* address, __nv_bfloat16 value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  atomic_add_half16_cas(address, __bfloat162float(value));
#else
  atomicAdd(address, value);
#endif
}

// ---- kernels --------------------------------------------------------------------------------

// Bits is an unsigned integer of the element's width: a gather only moves bits, and 0 bits
// are +0.0 in every float format.
template <typename Bits>
__global__ void gather_rows_kernel(const GatherRowsArgs args) {
  const Bits* __restrict__ x = static_cast<const Bits*>(args.x);
  Bits* __restrict__ out = static_cast<Bits*>(args.out);
  const int64_t total_rows = args.batch * args.heads * args.rows_out;
  const int64_t index_stride_h = (args.index_heads == 1) ? 0 : args.rows_out;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < total_rows;
       r += row_step) {
    const int64_t m = r % args.rows_out;
    const int64_t bh = r / args.rows_out;
    const int64_t h = bh % args.heads;
    const int64_t b = bh / args.heads;
    const int64_t i = args.index[b * args.index_heads * args.rows_out + h * index_stride_h + m];
    Bits* o_row = out + r * args.dim;  // [D]
    if (i < 0 || i >= args.rows_in) {
      for (int64_t d = threadIdx.x; d < args.dim; d += blockDim.x) o_row[d] = Bits(0);
      continue;
    }
    const Bits* x_row = x + b * args.x_stride_b + h * args.x_stride_h + i * args.x_stride_n;
    for (int64_t d = threadIdx.x; d < args.dim; d += blockDim.x) o_row[d] = x_row[d * args.x_stride_d];
  }
}

template <typename T>
__global__ void scatter_add_rows_kernel(const ScatterAddRowsArgs args) {
  const T* __restrict__ src = static_cast<const T*>(args.src);
  T* out = static_cast<T*>(args.out);
  const int64_t total_rows = args.batch * args.heads * args.rows_in;
  const int64_t index_stride_h = (args.index_heads == 1) ? 0 : args.rows_in;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < total_rows;
       r += row_step) {
    const int64_t m = r % args.rows_in;
    const int64_t bh = r / args.rows_in;
    const int64_t h = bh % args.heads;
    const int64_t b = bh / args.heads;
    const int64_t i = args.index[b * args.index_heads * args.rows_in + h * index_stride_h + m];
    if (i < 0 || i >= args.rows_out) continue;
    const T* s_row = src + b * args.src_stride_b + h * args.src_stride_h + m * args.src_stride_m;
    T* o_row = out + (bh * args.rows_out + i) * args.dim;  // [D]
    for (int64_t d = threadIdx.x; d < args.dim; d += blockDim.x) atomic_add(o_row + d, s_row[d * args.src_stride_d]);
  }
}

template <typename Bits>
cudaError_t gather_rows_impl(const GatherRowsArgs& args, cudaStream_t stream) {
  const LaunchShape shape = launch_shape(args.batch * args.heads * args.rows_out, args.dim);
  gather_rows_kernel<Bits><<<shape.grid, shape.block, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_add_rows_impl(const ScatterAddRowsArgs& args, cudaStream_t stream) {
  const LaunchShape shape = launch_shape(args.batch * args.heads * args.rows_in, args.dim);
  scatter_add_rows_kernel<T><<<shape.grid, shape.block, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_rows(const GatherRowsArgs& args, DType dtype, cudaStream_t stream) {
  if (args.batch * args.heads * args.rows_out == 0 || args.dim == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return gather_rows_impl<uint16_t>(args, stream);
    case DType::kFloat32:
      return gather_rows_impl<uint32_t>(args, stream);
    case DType::kFloat64:
      return gather_rows_impl<uint64_t>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_scatter_add_rows(const ScatterAddRowsArgs& args, DType dtype,
                                    cudaStream_t stream) {
  if (args.batch * args.heads * args.rows_in == 0 || args.dim == 0 || args.rows_out == 0) {
    return cudaSuccess;
  }
  switch (dtype) {
    case DType::kFloat16:
      return scatter_add_rows_impl<__half>(args, stream);
    case DType::kBFloat16:
      return scatter_add_rows_impl<__nv_bfloat16>(args, stream);
    case DType::kFloat32:
      return scatter_add_rows_impl<float>(args, stream);
    case DType::kFloat64:
      return scatter_add_rows_impl<double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lhattn
