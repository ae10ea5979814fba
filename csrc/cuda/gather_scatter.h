// CUDA launchers for the row gather / scatter-add ops (see csrc/ops.cpp for the semantics).
// No torch headers here or in gather_scatter.cu, so `nvcc -c` can compile-check the kernels
// on a machine whose torch has no CUDA; csrc/cuda/gather_scatter_cuda.cpp is the torch glue.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lhattn {
namespace cuda {

// Element type of the row tensors (x / src / out).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// out[b, h, m, :] = x[b, h, index[b, hi, m], :], hi = (index_heads == 1 ? 0 : h).
// An index < 0 or >= rows_in gives a zero row (no bounds error on the device).
struct GatherRowsArgs {
  const void* x;         // [batch, heads, rows_in, dim], strides below, in elements
  const int64_t* index;  // [batch, index_heads, rows_out], contiguous
  void* out;             // [batch, heads, rows_out, dim], contiguous
  int64_t batch;
  int64_t heads;
  int64_t index_heads;   // 1 or heads
  int64_t rows_in;       // N
  int64_t rows_out;      // M
  int64_t dim;           // D
  int64_t x_stride_b;
  int64_t x_stride_h;
  int64_t x_stride_n;
  int64_t x_stride_d;
};

// out[b, h, index[b, hi, m], :] += src[b, h, m, :] with atomics, in the element type.
// Entries with index < 0 or >= rows_out are skipped. `out` is NOT cleared here: pass a
// zero-filled buffer for a plain scatter. Duplicate indices accumulate in an unspecified
// order, so fp results may differ in the last bits between runs.
struct ScatterAddRowsArgs {
  const void* src;       // [batch, heads, rows_in, dim], strides below, in elements
  const int64_t* index;  // [batch, index_heads, rows_in], contiguous
  void* out;             // [batch, heads, rows_out, dim], contiguous
  int64_t batch;
  int64_t heads;
  int64_t index_heads;   // 1 or heads
  int64_t rows_in;       // M
  int64_t rows_out;      // n
  int64_t dim;           // D
  int64_t src_stride_b;
  int64_t src_stride_h;
  int64_t src_stride_m;
  int64_t src_stride_d;
};

// Both return cudaSuccess, cudaErrorInvalidValue for an unknown dtype, or the launch error
// (cudaGetLastError). Work is queued on `stream`; nothing is synchronized.
cudaError_t launch_gather_rows(const GatherRowsArgs& args, DType dtype, cudaStream_t stream);
cudaError_t launch_scatter_add_rows(const ScatterAddRowsArgs& args, DType dtype,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace lhattn
