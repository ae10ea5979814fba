// CUDA launcher for the fused LSG "norm" selection (semantics: csrc/lsg_select.cpp).
// No torch headers here or in lsg_select.cu, so `nvcc -c` can compile-check the kernel on a
// machine whose torch has no CUDA; csrc/cuda/lsg_select_cuda.cpp is the torch glue.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "gather_scatter.h"  // lhattn::cuda::DType

namespace lhattn {
namespace cuda {

// The largest chunk the kernel takes: one chunk's scores and ranks live in shared memory.
constexpr int64_t kLsgNormMaxChunk = 1024;

// Per (b, h, c): score the positions [c*chunk, (c+1)*chunk) by their squared key norm (left to
// right over D, no FMA; -1 for masked positions and positions >= tokens), rank them (score
// descending, NaN first, ties by position ascending), and write the `keep` best in ascending
// score order to slots [c*keep, (c+1)*keep) of index / k_out / v_out (index -1 and zero rows
// for positions >= tokens).
struct LsgNormSelectArgs {
  const void* k;             // [batch, heads, tokens, dim], strides below, in elements
  const void* v;             // [batch, heads, tokens, dim_v], strides below, in elements
  const uint8_t* mask;       // [batch, tokens] bool (1 = not selectable first), strides below; may be null
  void* k_out;               // [batch, heads, num_chunks * keep, dim], contiguous
  void* v_out;               // [batch, heads, num_chunks * keep, dim_v], contiguous
  int64_t* index_out;        // [batch, heads, num_chunks * keep], contiguous
  int64_t batch;
  int64_t heads;
  int64_t tokens;            // T
  int64_t dim;               // D
  int64_t dim_v;             // Dv
  int64_t chunk;             // 1 .. kLsgNormMaxChunk
  int64_t keep;              // 1 .. chunk
  int64_t num_chunks;        // num_chunks * chunk >= tokens
  int64_t k_stride_b;
  int64_t k_stride_h;
  int64_t k_stride_t;
  int64_t k_stride_d;
  int64_t v_stride_b;
  int64_t v_stride_h;
  int64_t v_stride_t;
  int64_t v_stride_d;
  int64_t mask_stride_b;
  int64_t mask_stride_t;
};

// Returns cudaSuccess, cudaErrorInvalidValue for an unknown dtype or a chunk / keep out of range,
// or the launch error (cudaGetLastError). Work is queued on `stream`; nothing is synchronized.
cudaError_t launch_lsg_norm_select(const LsgNormSelectArgs& args, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace lhattn
