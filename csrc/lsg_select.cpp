// LSG "norm" sparse selection, fused: key norms + top-k per chunk + gather of k and v, one op.
//
//   lsg_norm_select(k [B, H, T, D], v [B, H, T, Dv], key_padding_mask [B, T] bool or None,
//                   chunk, keep, num_chunks)
//       -> (k_sel [B, H, M, D], v_sel [B, H, M, Dv], index [B, H, M] int64),  M = num_chunks * keep
//
// The tokens [0, num_chunks * chunk) are cut into chunks of `chunk` positions (positions >= T are
// end padding). Per (b, h, chunk c), every position p gets a score
//
//     s(p) = k[b,h,p,0]^2 + k[b,h,p,1]^2 + ... + k[b,h,p,D-1]^2
//
// summed left to right over d in acc_t (float for fp16 / bf16 / fp32, double for fp64), every
// product and every sum rounded on its own (no FMA), so every implementation computes the same
// bits; s(p) = -1 where key_padding_mask[b, p] is True (padding, or a global token) or p >= T.
// Positions are ranked by s descending, NaN above everything, ties by the lower position first
// (a strict total order: torch.topk's tie order is unspecified, this one is not). The `keep`
// best are written in reverse rank order -- ascending score, the LSG order -- to slots
// [c * keep, (c + 1) * keep):
//
//     index[b, h, c*keep + keep-1-r] = position of rank r, or -1 if that position is >= T
//     k_sel[b, h, m] = k[b, h, index[b, h, m]] (zero row for -1), v_sel likewise.
//
// `key_padding_mask` positions are still selected when fewer than `keep` tokens of a chunk are
// usable (they rank last): the caller masks them. The backward of k_sel / v_sel is
// scatter_add_rows(grad, index, T) (registered in lhattn/_lsg_ops.py, with the fake kernel).
// The plain-torch twin of this op is lhattn.selection._norm with impl="torch".
//
// This file: schema (TORCH_LIBRARY_FRAGMENT) + argument checks + CPU kernel; the CUDA kernel is
// csrc/cuda/lsg_select.cu, its torch glue csrc/cuda/lsg_select_cuda.cpp.

// Clang contracts a*b+c within one expression by default; the score must not (GCC: -std=c++17
// already means -ffp-contract=off, and the products and sums below are separate statements).
#pragma STDC FP_CONTRACT OFF

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace lhattn {

// The largest `chunk` the op accepts (the CUDA kernel keeps one chunk in shared memory).
constexpr int64_t kLsgMaxChunk = 1024;

// Shape / dtype / device checks shared by the CPU and CUDA kernels (the CUDA glue declares it
// again; keep the signature in sync with csrc/cuda/lsg_select_cuda.cpp).
void check_lsg_norm_select_args(const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& key_padding_mask, int64_t chunk,
                                int64_t keep, int64_t num_chunks) {
  constexpr const char* op = "lsg_norm_select";
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D [B, H, T, D], got ", k.dim(), "-D with shape ",
              k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D [B, H, T, Dv], got ", v.dim(), "-D with shape ",
              v.sizes());
  const auto dtype = k.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              op, ": k must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(v.scalar_type() == dtype, op, ": v.dtype must equal k.dtype (", dtype, "), got ",
              v.scalar_type());
  TORCH_CHECK(v.device() == k.device(), op, ": v is on ", v.device(), " but k is on ",
              k.device());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), op,
              ": v must be [B, H, T, Dv] with the B, H, T of k ", k.sizes(), ", got ", v.sizes());
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ",
                mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == k.size(0) && mask.size(1) == k.size(2), op,
                ": key_padding_mask must be [B, T] = [", k.size(0), ", ", k.size(2), "], got ",
                mask.sizes());
    TORCH_CHECK(mask.device() == k.device(), op, ": key_padding_mask is on ", mask.device(),
                " but k is on ", k.device());
  }
  TORCH_CHECK(chunk >= 1 && chunk <= kLsgMaxChunk, op, ": chunk must be in [1, ", kLsgMaxChunk,
              "], got ", chunk);
  TORCH_CHECK(keep >= 1 && keep <= chunk, op, ": keep must be in [1, chunk = ", chunk, "], got ",
              keep);
  TORCH_CHECK(num_chunks >= 0 && num_chunks * chunk >= k.size(2), op,
              ": num_chunks * chunk must cover T = ", k.size(2), " (num_chunks >= ",
              (k.size(2) + chunk - 1) / chunk, "), got num_chunks = ", num_chunks);
}

namespace {

// Positions scored together by the CPU kernel (independent sums: instruction-level parallelism).
constexpr int64_t kScoreLanes = 16;

// Rank order of two positions of one chunk: score descending, NaN first, then position ascending.
template <typename acc_t>
struct RanksBefore {
  const acc_t* score;
  bool operator()(int32_t i, int32_t j) const {
    const acc_t si = score[i], sj = score[j];
    const bool ni = std::isnan(si), nj = std::isnan(sj);
    if (ni || nj) return (ni && nj) ? i < j : ni;
    if (si != sj) return si > sj;
    return i < j;
  }
};

template <typename scalar_t>
void copy_row(const scalar_t* src, int64_t stride, int64_t n, scalar_t* dst) {
  if (stride == 1) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d * stride];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsg_norm_select_cpu(
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& key_padding_mask,
    int64_t chunk, int64_t keep, int64_t num_chunks) {
  check_lsg_norm_select_args(k, v, key_padding_mask, chunk, keep, num_chunks);
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3), Dv = v.size(3);
  const int64_t M = num_chunks * keep;
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor k_sel = at::empty({B, H, M, D}, k.options().memory_format(contiguous));
  at::Tensor v_sel = at::empty({B, H, M, Dv}, v.options().memory_format(contiguous));
  at::Tensor index = at::empty({B, H, M}, k.options().dtype(at::kLong).memory_format(contiguous));
  if (B * H * M == 0) return {k_sel, v_sel, index};

  at::Tensor mask;  // [B, T] bool, or undefined
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;

  const int64_t sk_b = k.stride(0), sk_h = k.stride(1), sk_t = k.stride(2), sk_d = k.stride(3);
  const int64_t sv_b = v.stride(0), sv_h = v.stride(1), sv_t = v.stride(2), sv_d = v.stride(3);
  // One task = one (b, h, chunk): about chunk * D multiply-adds plus keep * (D + Dv) copies.
  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(chunk * std::max<int64_t>(D, 1), 1));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "lsg_norm_select_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for fp16 / bf16 / fp32, double for fp64
    const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    scalar_t* ks_ptr = k_sel.mutable_data_ptr<scalar_t>();
    scalar_t* vs_ptr = v_sel.mutable_data_ptr<scalar_t>();
    int64_t* idx_ptr = index.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B * H * num_chunks, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> score(chunk);
      std::vector<int32_t> order(chunk);
      std::vector<acc_t> tile(kScoreLanes * D);  // [D, kScoreLanes]: kScoreLanes rows, transposed
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task % num_chunks, bh = task / num_chunks, h = bh % H, b = bh / H;
        const int64_t p0 = c * chunk;
        const scalar_t* k_bh = k_ptr + b * sk_b + h * sk_h;
        // 1. scores, kScoreLanes positions at a time: each position's sum runs left to right over
        // d, but the lanes are independent (and vectorize), so the dependent adds overlap.
        for (int64_t j0 = 0; j0 < chunk; j0 += kScoreLanes) {
          for (int64_t l = 0; l < kScoreLanes; ++l) {
            const int64_t p = p0 + j0 + l;
            const bool live = j0 + l < chunk && p < T;
            const scalar_t* row = k_bh + p * sk_t;
            for (int64_t d = 0; d < D; ++d) tile[d * kScoreLanes + l] = live ? static_cast<acc_t>(row[d * sk_d]) : acc_t(0);
          }
          acc_t s[kScoreLanes] = {};
          for (int64_t d = 0; d < D; ++d) {
            const acc_t* x = tile.data() + d * kScoreLanes;
            for (int64_t l = 0; l < kScoreLanes; ++l) {
              const acc_t sq = x[l] * x[l];
              s[l] = s[l] + sq;
            }
          }
          for (int64_t l = 0; l < kScoreLanes && j0 + l < chunk; ++l) {
            const int64_t p = p0 + j0 + l;
            const bool masked = p >= T || (mask_ptr != nullptr && mask_ptr[b * T + p]);
            score[j0 + l] = masked ? acc_t(-1) : s[l];
          }
        }
        // 2. the `keep` best in rank order (a strict total order: deterministic)
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                          RanksBefore<acc_t>{score.data()});
        // 3. gather, ascending score: slot keep-1-r gets rank r
        const int64_t m0 = bh * M + c * keep;
        for (int64_t r = 0; r < keep; ++r) {
          const int64_t m = m0 + keep - 1 - r;
          const int64_t p = p0 + order[r];
          scalar_t* ko = ks_ptr + m * D;
          scalar_t* vo = vs_ptr + m * Dv;
          if (p >= T) {
            idx_ptr[m] = -1;
            std::fill(ko, ko + D, scalar_t(0));
            std::fill(vo, vo + Dv, scalar_t(0));
            continue;
          }
          idx_ptr[m] = p;
          copy_row(k_bh + p * sk_t, sk_d, D, ko);
          copy_row(v_ptr + b * sv_b + h * sv_h + p * sv_t, sv_d, Dv, vo);
        }
      }
    });
  });
  return {k_sel, v_sel, index};
}

}  // namespace
}  // namespace lhattn

TORCH_LIBRARY_FRAGMENT(lhattn, m) {
  // Fake kernel and autograd formula: lhattn/_lsg_ops.py.
  m.set_python_module("lhattn._lsg_ops");
  m.def(
      "lsg_norm_select(Tensor k, Tensor v, Tensor? key_padding_mask, int chunk, int keep, "
      "int num_chunks) -> (Tensor k_sel, Tensor v_sel, Tensor index)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(lhattn, CPU, m) { m.impl("lsg_norm_select", &lhattn::lsg_norm_select_cpu); }
