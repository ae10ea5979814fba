// Attention-dropout keep bits on the CPU: the rule of lhattn/_dropout.py, for the blocked fallback.
//
//   dropout_keep(row_keys [B, X] int64, cols [1 or B, L] int64, state [2] int64) -> [B, X, L] bool
//       out[b, x, l] = mix32(uint32(row_keys[b, x]) ^ uint32(cols[b or 0, l])) >= uint32(state[1])
//
// row_keys are the per-row keys R = mix32(K ^ i) (already reduced to [0, 2^32)); cols are key
// columns (negative padding slots are hashed like any value: the caller masks those entries).
// In plain torch the same bits cost ~20 elementwise int64 passes over the [B, X, L] block; here
// one pass of 32-bit integer arithmetic. lhattn/_dropout.py stays the definition (and the CUDA
// path); tests check that the two agree bit for bit. Fake kernel: lhattn/_ops.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace lhattn {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

at::Tensor dropout_keep_cpu(const at::Tensor& row_keys, const at::Tensor& cols, const at::Tensor& state) {
  TORCH_CHECK(row_keys.scalar_type() == at::kLong && row_keys.dim() == 2,
              "dropout_keep: row_keys must be a 2-D int64 tensor [B, X], got ", row_keys.scalar_type(),
              " with shape ", row_keys.sizes());
  TORCH_CHECK(cols.scalar_type() == at::kLong && cols.dim() == 2,
              "dropout_keep: cols must be a 2-D int64 tensor [1 or B, L], got ", cols.scalar_type(),
              " with shape ", cols.sizes());
  TORCH_CHECK(cols.size(0) == 1 || cols.size(0) == row_keys.size(0), "dropout_keep: cols.size(0) must be 1 or ",
              row_keys.size(0), " (row_keys.size(0)), got ", cols.size(0));
  TORCH_CHECK(state.scalar_type() == at::kLong && state.numel() == 2,
              "dropout_keep: state must be the int64 [2] dropout state (seed, threshold), got ",
              state.scalar_type(), " with shape ", state.sizes());
  TORCH_CHECK(row_keys.device().is_cpu() && cols.device().is_cpu() && state.device().is_cpu(),
              "dropout_keep: this kernel is CPU-only");
  const auto rk = row_keys.contiguous();
  const auto cc = cols.contiguous();
  const int64_t B = rk.size(0), X = rk.size(1), L = cc.size(1);
  const bool per_batch = cc.size(0) != 1;
  const uint32_t thresh = static_cast<uint32_t>(state.contiguous().data_ptr<int64_t>()[1]);
  auto out = at::empty({B, X, L}, rk.options().dtype(at::kBool));
  const int64_t* rp = rk.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  bool* op = out.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1));
  at::parallel_for(0, B * X, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t r = static_cast<uint32_t>(rp[i]);
      const int64_t* c = cp + (per_batch ? (i / X) * L : 0);
      bool* o = op + i * L;
      for (int64_t l = 0; l < L; ++l) {
        o[l] = mix32(r ^ static_cast<uint32_t>(c[l])) >= thresh;
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace lhattn

TORCH_LIBRARY_FRAGMENT(lhattn, m) {
  m.set_python_module("lhattn._ops");
  m.def("dropout_keep(Tensor row_keys, Tensor cols, Tensor state) -> Tensor", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(lhattn, CPU, m) { m.impl("dropout_keep", &lhattn::dropout_keep_cpu); }
