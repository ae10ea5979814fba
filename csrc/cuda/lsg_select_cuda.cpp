// Torch glue for the CUDA fused LSG "norm" selection (kernel in lsg_select.cu; semantics and the
// CPU kernel in csrc/lsg_select.cpp). Same contract and same bits as the CPU kernel.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lsg_select.h"

namespace lhattn {

// Defined in csrc/lsg_select.cpp.
void check_lsg_norm_select_args(const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& key_padding_mask, int64_t chunk,
                                int64_t keep, int64_t num_chunks);

namespace {

cuda::DType lsg_launcher_dtype(at::ScalarType dtype) {
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
      TORCH_CHECK(false, "lsg_norm_select: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsg_norm_select_cuda(
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& key_padding_mask,
    int64_t chunk, int64_t keep, int64_t num_chunks) {
  check_lsg_norm_select_args(k, v, key_padding_mask, chunk, keep, num_chunks);
  const c10::cuda::CUDAGuard device_guard(k.device());
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3), Dv = v.size(3);
  const int64_t M = num_chunks * keep;
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor k_sel = at::empty({B, H, M, D}, k.options().memory_format(contiguous));
  at::Tensor v_sel = at::empty({B, H, M, Dv}, v.options().memory_format(contiguous));
  at::Tensor index = at::empty({B, H, M}, k.options().dtype(at::kLong).memory_format(contiguous));

  cuda::LsgNormSelectArgs args{};
  args.k = k.const_data_ptr();
  args.v = v.const_data_ptr();
  args.mask = nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    args.mask = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
    args.mask_stride_b = mask.stride(0);
    args.mask_stride_t = mask.stride(1);
  }
  args.k_out = k_sel.mutable_data_ptr();
  args.v_out = v_sel.mutable_data_ptr();
  args.index_out = index.mutable_data_ptr<int64_t>();
  args.batch = B;
  args.heads = H;
  args.tokens = T;
  args.dim = D;
  args.dim_v = Dv;
  args.chunk = chunk;
  args.keep = keep;
  args.num_chunks = num_chunks;
  args.k_stride_b = k.stride(0);
  args.k_stride_h = k.stride(1);
  args.k_stride_t = k.stride(2);
  args.k_stride_d = k.stride(3);
  args.v_stride_b = v.stride(0);
  args.v_stride_h = v.stride(1);
  args.v_stride_t = v.stride(2);
  args.v_stride_d = v.stride(3);
  const cudaError_t err = cuda::launch_lsg_norm_select(args, lsg_launcher_dtype(k.scalar_type()),
                                                       c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lsg_norm_select: CUDA launch failed: ", cudaGetErrorString(err));
  return {k_sel, v_sel, index};
}

}  // namespace
}  // namespace lhattn

TORCH_LIBRARY_IMPL(lhattn, CUDA, m) { m.impl("lsg_norm_select", &lhattn::lsg_norm_select_cuda); }
