// Torch glue for the CUDA row gather / scatter-add (kernels in gather_scatter.cu).
// Same contract as the CPU kernels in csrc/ops.cpp, except that an index >= N (gather) or
// >= n (scatter) is not reported (that would need a device sync): it is treated like a
// negative index, an empty slot. scatter_add_rows uses atomics in the element type, so the
// summation order of duplicate indices (and the last bits of the result) may vary.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gather_scatter.h"

namespace lhattn {

// Defined in csrc/ops.cpp.
void check_rows_args(const at::Tensor& rows, const at::Tensor& index, const char* op,
                     const char* rows_name, bool scatter);

namespace {

cuda::DType to_launcher_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    default:
      TORCH_CHECK(false, "lhattn: unsupported dtype ", dtype);
  }
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index_in) {
  check_rows_args(x, index_in, "gather_rows", "x", /*scatter=*/false);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor index = index_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  const int64_t Hi = index.size(1), M = index.size(2);
  at::Tensor out = at::empty({B, H, M, D}, x.options().memory_format(at::MemoryFormat::Contiguous));

  cuda::GatherRowsArgs args{};
  args.x = x.const_data_ptr();
  args.index = index.const_data_ptr<int64_t>();
  args.out = out.mutable_data_ptr();
  args.batch = B;
  args.heads = H;
  args.index_heads = Hi;
  args.rows_in = N;
  args.rows_out = M;
  args.dim = D;
  args.x_stride_b = x.stride(0);
  args.x_stride_h = x.stride(1);
  args.x_stride_n = x.stride(2);
  args.x_stride_d = x.stride(3);
  const cudaError_t err = cuda::launch_gather_rows(args, to_launcher_dtype(x.scalar_type()),
                                                   c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gather_rows: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor scatter_add_rows_cuda(const at::Tensor& src, const at::Tensor& index_in, int64_t n) {
  check_rows_args(src, index_in, "scatter_add_rows", "src", /*scatter=*/true);
  TORCH_CHECK(n >= 0, "scatter_add_rows: n must be >= 0, got ", n);
  const c10::cuda::CUDAGuard device_guard(src.device());
  const at::Tensor index = index_in.contiguous();
  const int64_t B = src.size(0), H = src.size(1), M = src.size(2), D = src.size(3);
  at::Tensor out = at::zeros({B, H, n, D}, src.options().memory_format(at::MemoryFormat::Contiguous));

  cuda::ScatterAddRowsArgs args{};
  args.src = src.const_data_ptr();
  args.index = index.const_data_ptr<int64_t>();
  args.out = out.mutable_data_ptr();
  args.batch = B;
  args.heads = H;
  args.index_heads = index.size(1);
  args.rows_in = M;
  args.rows_out = n;
  args.dim = D;
  args.src_stride_b = src.stride(0);
  args.src_stride_h = src.stride(1);
  args.src_stride_m = src.stride(2);
  args.src_stride_d = src.stride(3);
  const cudaError_t err = cuda::launch_scatter_add_rows(
      args, to_launcher_dtype(src.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "scatter_add_rows: CUDA launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace lhattn

TORCH_LIBRARY_IMPL(lhattn, CUDA, m) {
  m.impl("gather_rows", &lhattn::gather_rows_cuda);
  m.impl("scatter_add_rows", &lhattn::scatter_add_rows_cuda);
}
