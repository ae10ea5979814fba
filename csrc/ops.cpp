// Row gather / scatter-add: the data movement of sparse key selection.
//
//   gather_rows(x [B, H, N, D], index [B, Hi, M]) -> [B, H, M, D]
//       out[b, h, m, :] = x[b, h, index[b, hi, m], :]      (zero row where index < 0)
//   scatter_add_rows(src [B, H, M, D], index [B, Hi, M], n) -> [B, H, n, D]
//       out = 0;  out[b, h, index[b, hi, m], :] += src[b, h, m, :]   (skipped where index < 0)
//
// Hi is 1 (one index list shared by every head) or H (one list per head); hi = 0 or h.
// scatter_add_rows is the adjoint of gather_rows; autograd and fake kernels live in
// lhattn/_ops.py. This file holds the schemas (TORCH_LIBRARY: later op families add theirs
// with TORCH_LIBRARY_FRAGMENT) and the CPU kernels; the CUDA kernels are in csrc/cuda/.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

// `import lhattn._C` needs a module init function. The module itself is empty: loading the
// shared object runs the TORCH_LIBRARY registrations below, which is all it is for.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "lhattn C++/CUDA operators, registered as torch.ops.lhattn.*",  // doc
      -1,  // size of per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace lhattn {

// Shape / dtype / device checks shared by the CPU and CUDA kernels (the CUDA glue declares
// it again; keep the signature in sync with csrc/cuda/gather_scatter_cuda.cpp).
// `rows` is x ([B, H, N, D]) for gather, src ([B, H, M, D]) for scatter.
// `scatter` additionally requires index.size(2) == rows.size(2).
void check_rows_args(const at::Tensor& rows, const at::Tensor& index, const char* op,
                     const char* rows_name, bool scatter) {
  TORCH_CHECK(rows.dim() == 4, op, ": ", rows_name, " must be 4-D [B, H, ",
              scatter ? "M" : "N", ", D], got ", rows.dim(), "-D with shape ", rows.sizes());
  const auto dtype = rows.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              op, ": ", rows_name, " must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 3, op, ": index must be 3-D [B, Hi, M], got ", index.dim(),
              "-D with shape ", index.sizes());
  TORCH_CHECK(index.device() == rows.device(), op, ": index is on ", index.device(),
              " but ", rows_name, " is on ", rows.device(), "; both must be on the same device");
  TORCH_CHECK(index.size(0) == rows.size(0), op, ": index.size(0) (B) = ", index.size(0),
              " must equal ", rows_name, ".size(0) = ", rows.size(0));
  TORCH_CHECK(index.size(1) == 1 || index.size(1) == rows.size(1), op,
              ": index.size(1) (Hi) must be 1 or ", rows_name, ".size(1) = ", rows.size(1),
              ", got ", index.size(1));
  if (scatter) {
    TORCH_CHECK(index.size(2) == rows.size(2), op, ": index.size(2) (M) = ", index.size(2),
                " must equal ", rows_name, ".size(2) = ", rows.size(2));
  }
}

namespace {

// Raises IndexError naming the first entry of `index` (contiguous, CPU) that is >= n.
void check_index_below(const at::Tensor& index, int64_t n, const char* op, const char* n_desc) {
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t total = index.numel();
  for (int64_t i = 0; i < total; ++i) {
    if (idx[i] >= n) {
      const int64_t M = index.size(2);
      const int64_t Hi = index.size(1);
      TORCH_CHECK_INDEX(false, op, ": index[", i / (Hi * M), ", ", (i / M) % Hi, ", ", i % M,
                        "] = ", idx[i], " is out of range for ", n_desc, " = ", n,
                        "; allowed: 0 <= index < ", n, ", or a negative value for an empty slot");
    }
  }
}

// Rows per parallel_for chunk, so that a chunk moves about GRAIN_SIZE elements.
int64_t row_grain(int64_t D) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
}

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index_in) {
  check_rows_args(x, index_in, "gather_rows", "x", /*scatter=*/false);
  const at::Tensor index = index_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  const int64_t Hi = index.size(1), M = index.size(2);
  check_index_below(index, N, "gather_rows", "x.size(2) (N)");

  at::Tensor out = at::empty({B, H, M, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const int64_t s_b = x.stride(0), s_h = x.stride(1), s_n = x.stride(2), s_d = x.stride(3);
  const int64_t index_stride_h = (Hi == 1) ? 0 : M;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cpu", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const int64_t* idx_ptr = index.const_data_ptr<int64_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H * M, row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t m = r % M, bh = r / M, h = bh % H, b = bh / H;
        const int64_t i = idx_ptr[b * Hi * M + h * index_stride_h + m];
        scalar_t* o = out_ptr + r * D;
        if (i < 0) {
          std::fill(o, o + D, scalar_t(0));
          continue;
        }
        const scalar_t* xr = x_ptr + b * s_b + h * s_h + i * s_n;
        if (s_d == 1) {
          for (int64_t d = 0; d < D; ++d) o[d] = xr[d];
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = xr[d * s_d];
        }
      }
    });
  });
  return out;
}

// Race-free and deterministic: each task owns one (b, h) and one chunk of D, and walks m in
// order, so no two threads ever add into the same output element. fp16 / bf16 inputs are
// accumulated in an fp32 buffer and rounded once at the end.
at::Tensor scatter_add_rows_cpu(const at::Tensor& src, const at::Tensor& index_in, int64_t n) {
  check_rows_args(src, index_in, "scatter_add_rows", "src", /*scatter=*/true);
  TORCH_CHECK(n >= 0, "scatter_add_rows: n must be >= 0, got ", n);
  const at::Tensor index = index_in.contiguous();
  const int64_t B = src.size(0), H = src.size(1), M = src.size(2), D = src.size(3);
  const int64_t Hi = index.size(1);
  check_index_below(index, n, "scatter_add_rows", "n");

  const auto dtype = src.scalar_type();
  const bool reduced = (dtype == at::kHalf || dtype == at::kBFloat16);
  at::Tensor acc = at::zeros({B, H, n, D}, src.options().dtype(reduced ? at::kFloat : dtype));
  if (acc.numel() == 0 || M == 0) return reduced ? acc.to(dtype) : acc;

  const int64_t s_b = src.stride(0), s_h = src.stride(1), s_m = src.stride(2), s_d = src.stride(3);
  const int64_t index_stride_h = (Hi == 1) ? 0 : M;
  constexpr int64_t kChunkD = 64;
  const int64_t n_chunks = (D + kChunkD - 1) / kChunkD;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scatter_add_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src_ptr = src.const_data_ptr<scalar_t>();
    const int64_t* idx_ptr = index.const_data_ptr<int64_t>();
    acc_t* acc_ptr = acc.mutable_data_ptr<acc_t>();
    // One task reads all M rows of its chunk: aim for about GRAIN_SIZE elements per task.
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(M * std::min(D, kChunkD), 1));
    at::parallel_for(0, B * H * n_chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t chunk = task % n_chunks, bh = task / n_chunks, h = bh % H, b = bh / H;
        const int64_t d0 = chunk * kChunkD, d1 = std::min(D, d0 + kChunkD);
        const int64_t* idx_row = idx_ptr + b * Hi * M + h * index_stride_h;
        const scalar_t* src_bh = src_ptr + b * s_b + h * s_h;
        acc_t* acc_bh = acc_ptr + bh * n * D;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t i = idx_row[m];
          if (i < 0) continue;
          acc_t* a = acc_bh + i * D;
          const scalar_t* s = src_bh + m * s_m;
          if (s_d == 1) {
            for (int64_t d = d0; d < d1; ++d) a[d] += static_cast<acc_t>(s[d]);
          } else {
            for (int64_t d = d0; d < d1; ++d) a[d] += static_cast<acc_t>(s[d * s_d]);
          }
        }
      }
    });
  });
  return reduced ? acc.to(dtype) : acc;
}

}  // namespace
}  // namespace lhattn

TORCH_LIBRARY(lhattn, m) {
  // Fake (meta) kernels and autograd formulas are registered from this Python module.
  m.set_python_module("lhattn._ops");
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("scatter_add_rows(Tensor src, Tensor index, SymInt n) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(lhattn, CPU, m) {
  m.impl("gather_rows", &lhattn::gather_rows_cpu);
  m.impl("scatter_add_rows", &lhattn::scatter_add_rows_cpu);
}
