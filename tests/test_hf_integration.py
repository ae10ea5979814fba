"""Hugging Face Longformer patched onto lhattn equals HF's own Longformer: outputs and gradients.

Tiny random models (never downloaded): hidden 32, 2 heads (D = 16), 2 layers with different
windows (attention_window = [8, 16]), fp32. Inputs have global tokens (different counts per
batch row) and padding. The patched model must also run an unpadded, odd-length input and
agree with the unpatched model, which pads it internally.
"""

import copy

import pytest
import torch

import lhattn
from lhattn.integrations.huggingface import is_patched, patch_longformer, unpatch_longformer

transformers = pytest.importorskip("transformers")
from transformers import LongformerConfig, LongformerForMaskedLM, LongformerModel  # noqa: E402
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

RTOL = 1e-5  # fp32: max |patched - HF| <= RTOL * max |HF| (+ atol), per tensor
# Gradients that are 0 in exact arithmetic (the key biases: softmax ignores a per-query shift) are
# rounding noise in both models; they are held to RTOL x 1e-3 x the largest gradient of the model.
ZERO_GRAD_FLOOR = 1e-3


def _triton_reason(device) -> str:
    """Why backend='triton' cannot run the patched attention here (None if it can)."""
    q = torch.randn(1, 2, 8, 16, device=device)
    return lhattn.triton_unavailable_reason(q, lhattn.SlidingWindow((4, 4)))


def _backend_device(backend):
    """(backend, device) pairs; triton runs on CUDA when there is one, else in the interpreter on CPU."""
    if backend != "triton":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


BACKENDS = ["fallback", "reference", "triton"]


def _config(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                attention_window=[8, 16], max_position_embeddings=160, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    base.update(kw)
    return LongformerConfig(**base)


def _models(cls, device, backend, **kw):
    """(HF model, lhattn-patched copy with the same weights), both in eval mode."""
    torch.manual_seed(0)
    ref = cls(_config(**kw)).to(device).eval()
    return ref, patch_longformer(copy.deepcopy(ref), backend=backend)


def _inputs(b, n, device, padding=True, seed=0):
    """input_ids [B, N], attention_mask [B, N] (0 = padding), global_attention_mask [B, N] (1 = global)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (b, n), generator=gen)
    mask = torch.ones(b, n, dtype=torch.long)
    glob = torch.zeros(b, n, dtype=torch.long)
    glob[:, 0] = 1  # <s> global in every row
    glob[0, [5, n // 2]] = 1  # row 0: three global tokens, row 1: one
    if padding:
        length = n - 7  # row 1 ends with 7 padding tokens
        mask[1, length:] = 0
        ids[1, length:] = 1
    return ids.to(device), mask.to(device), glob.to(device)


def _assert_rel(name, got, want, rtol=RTOL, atol=0.0):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach(), want.detach()
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= rtol * scale + atol, (
        f"{name}: max |patched - HF| = {err:.2e} > {rtol:.0e} x max |HF| ({scale:.2e}) + {atol:.0e}")


def _assert_grads(patched, ref):
    """Every parameter gradient of the patched model equals HF's; returns how many were compared."""
    ref_params = dict(ref.named_parameters())
    biggest = max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
    checked = 0
    for name, p in patched.named_parameters():
        want = ref_params[name].grad
        if want is None:
            assert p.grad is None, f"{name}: patched model has a gradient where HF has none"
            continue
        _assert_rel(f"grad {name}", p.grad, want, atol=RTOL * ZERO_GRAD_FLOOR * biggest)
        checked += 1
    return checked


def _forbid_hf_chunks(monkeypatch):
    """Make HF's own sliding-chunks attention unusable: proves the patched path ran."""
    def boom(*args, **kwargs):
        raise AssertionError("HF's sliding-chunks attention ran in a patched model")
    monkeypatch.setattr(LongformerSelfAttention, "_sliding_chunks_query_key_matmul", boom)


def _maybe_skip(backend, device):
    if backend == "triton":
        why = _triton_reason(device)
        if why is not None:
            pytest.skip(f"backend='triton' cannot run here: {why}")


def _run_lm(model, ids, mask, glob, labels):
    out = model(input_ids=ids, attention_mask=mask, global_attention_mask=glob, labels=labels)
    out.loss.backward()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_lm_outputs_and_gradients_match_hf(backend, monkeypatch):
    device = _backend_device(backend)
    _maybe_skip(backend, device)
    ref, patched = _models(LongformerForMaskedLM, device, backend)
    ids, mask, glob = _inputs(2, 48, device)  # 48 = 3 x max(attention_window): HF adds no padding itself
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    want = _run_lm(ref, ids, mask, glob, labels)
    _forbid_hf_chunks(monkeypatch)
    got = _run_lm(patched, ids, mask, glob, labels)
    _assert_rel("logits", got.logits, want.logits)
    _assert_rel("loss", got.loss, want.loss)
    checked = _assert_grads(patched, ref)
    ref_params = dict(ref.named_parameters())
    # every attention projection, the global ones included, must have been reached
    for part in ("query", "key", "value", "query_global", "key_global", "value_global"):
        for layer in range(2):
            name = f"longformer.encoder.layer.{layer}.attention.self.{part}.weight"
            assert ref_params[name].grad is not None and ref_params[name].grad.abs().max() > 0, name
    assert checked > 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpadded_odd_length_matches_hf(backend, monkeypatch):
    """n = 41 is no multiple of the window: HF pads to 48 internally, the patched model does not pad."""
    device = _backend_device(backend)
    _maybe_skip(backend, device)
    ref, patched = _models(LongformerModel, device, backend)
    ids, mask, glob = _inputs(2, 41, device)
    calls = []
    hf_pad = LongformerModel._pad_to_window_size

    def spy(self, *args, **kwargs):
        res = hf_pad(self, *args, **kwargs)
        calls.append(res[0])
        return res
    monkeypatch.setattr(LongformerModel, "_pad_to_window_size", spy)
    want = ref(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
    assert calls == [7], "the unpatched model should have padded 41 tokens to 48"

    embeds = {}

    def capture(module, args, kwargs, out):  # the encoder's input: the patched model must see 41 tokens
        embeds["n"] = args[0].shape[1]
    handle = patched.encoder.register_forward_hook(capture, with_kwargs=True)
    _forbid_hf_chunks(monkeypatch)
    got = patched(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
    handle.remove()
    assert embeds["n"] == 41, f"patched model padded its input to {embeds['n']} tokens"
    _assert_rel("last_hidden_state", got.last_hidden_state, want.last_hidden_state)
    _assert_rel("pooler_output", got.pooler_output, want.pooler_output)

    dout = torch.randn(want.last_hidden_state.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (want.last_hidden_state * dout).sum().backward()
    (got.last_hidden_state * dout).sum().backward()
    assert _assert_grads(patched, ref) > 20


def test_no_global_tokens_and_inputs_embeds(monkeypatch):
    """No global tokens (HF's is_global_attn=False path) and inputs_embeds instead of ids."""
    ref, patched = _models(LongformerModel, "cpu", "fallback")
    ids, mask, _ = _inputs(2, 37, "cpu")
    embeds = ref.embeddings.word_embeddings(ids).detach()
    want = ref(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    _forbid_hf_chunks(monkeypatch)
    got = patched(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    _assert_rel("last_hidden_state", got, want)


def test_unpatch_restores_hf(monkeypatch):
    ref, patched = _models(LongformerModel, "cpu", "fallback")
    layers = [m for m in patched.modules() if isinstance(m, LongformerSelfAttention)]
    assert len(layers) == 2 and all(is_patched(m) for m in layers)
    assert "_pad_to_window_size" in vars(patched)
    unpatch_longformer(patched)
    assert not any(is_patched(m) for m in layers)
    assert "_pad_to_window_size" not in vars(patched) and all("forward" not in vars(m) for m in layers)
    ids, mask, glob = _inputs(2, 41, "cpu")
    want = ref(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state
    got = patched(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set(patched.state_dict()) == set(ref.state_dict())


def test_output_attentions_raises():
    _, patched = _models(LongformerModel, "cpu", "fallback")
    ids, mask, glob = _inputs(1, 24, "cpu", padding=False)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        patched(input_ids=ids, attention_mask=mask, global_attention_mask=glob, output_attentions=True)


def test_attention_dropout_in_training_raises_and_zero_dropout_trains():
    ids, mask, glob = _inputs(1, 24, "cpu", padding=False)
    _, patched = _models(LongformerModel, "cpu", "fallback", attention_probs_dropout_prob=0.1)
    patched.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        patched(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
    patched.eval()  # eval: dropout is off, the patched model runs
    patched(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
    _, patched = _models(LongformerModel, "cpu", "fallback", attention_probs_dropout_prob=0.0)
    patched.train()
    patched(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state.sum().backward()


def test_bad_arguments():
    model = LongformerModel(_config())
    with pytest.raises(ValueError, match="backend"):
        patch_longformer(model, backend="cuda")
    with pytest.raises(ValueError, match="LongformerSelfAttention"):
        patch_longformer(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        patch_longformer("not a model")
