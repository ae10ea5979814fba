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

from tolerance import assert_close_to_oracle

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


# ---- attention-probability dropout ----------------------------------------------------------------

P_DROP = 0.1  # HF's default attention_probs_dropout_prob


def test_attention_dropout_eval_matches_hf(monkeypatch):
    """attention_probs_dropout_prob > 0 in eval mode: nothing is dropped, the patched model equals HF."""
    ref, patched = _models(LongformerModel, "cpu", "fallback", attention_probs_dropout_prob=P_DROP,
                           hidden_dropout_prob=P_DROP)
    ids, mask, glob = _inputs(2, 41, "cpu")
    want = ref(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state
    _forbid_hf_chunks(monkeypatch)
    got = patched(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state
    _assert_rel("last_hidden_state (eval, attention_probs_dropout_prob=0.1)", got, want)


@pytest.mark.parametrize("backend", ["fallback", "triton"])
def test_attention_dropout_training_forward_backward(backend, monkeypatch):
    """Training with HF's default dropouts (attention and hidden 0.1): the patched model runs forward
    and backward, and ``backend`` equals the reference backend step for step under the same
    torch.manual_seed (the logits, the loss and every parameter gradient)."""
    device = _backend_device(backend)
    _maybe_skip(backend, device)
    _, patched = _models(LongformerForMaskedLM, device, backend, attention_probs_dropout_prob=P_DROP,
                         hidden_dropout_prob=P_DROP)
    reference = patch_longformer(copy.deepcopy(patched), backend="reference")
    ids, mask, glob = _inputs(2, 41, device)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    _forbid_hf_chunks(monkeypatch)
    outs = []
    for model in (reference, patched):
        model.train()
        torch.manual_seed(5)
        outs.append(_run_lm(model, ids, mask, glob, labels))
    _assert_rel("logits (training)", outs[1].logits, outs[0].logits)
    _assert_rel("loss (training)", outs[1].loss, outs[0].loss)
    assert _assert_grads(patched, reference) > 20


def _self_attention(layer, dtype=torch.float64):
    """Layer ``layer``'s LongformerSelfAttention of a patched model (fallback backend), in training,
    with attention_probs_dropout_prob = P_DROP."""
    _, patched = _models(LongformerModel, "cpu", "fallback", attention_probs_dropout_prob=P_DROP)
    return patched.encoder.layer[layer].attention.self.to(dtype).train()


def _layer_inputs(dtype, b=2, n=29):
    """hidden_states [B, N, hidden] and the layer's masks, as LongformerModel hands them over:
    attention_mask < 0 padding, 0 local, > 0 global; is_index_masked, is_index_global_attn."""
    hidden = torch.randn(b, n, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, n - 6:] = True
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[:, 0] = True
    glob[0, [7, 20]] = True
    attention_mask = torch.zeros(b, n, dtype=dtype).masked_fill(glob, 10000.0).masked_fill(pad, -10000.0)
    return hidden, dict(attention_mask=attention_mask, is_index_masked=pad, is_index_global_attn=glob,
                        is_global_attn=True)


def _by_hand(module, hidden, masks):
    """lhattn.sliding_window_attention (reference backend) fed the module's own projections."""
    b, n, e = hidden.shape
    w = module.config.attention_window[module.layer_id] // 2

    def heads(x):
        return x.view(b, n, module.num_heads, module.head_dim).transpose(1, 2)

    q, k, v = (heads(lin(hidden)) for lin in (module.query, module.key, module.value))
    qkv_g = tuple(heads(lin(hidden)) for lin in (module.query_global, module.key_global, module.value_global))
    out = lhattn.sliding_window_attention(q, k, v, (w, w), key_padding_mask=masks["is_index_masked"],
                                          global_mask=masks["is_index_global_attn"], global_qkv=qkv_g,
                                          scale=module.head_dim ** -0.5, dropout_p=module.dropout,
                                          backend="reference")
    return out.transpose(1, 2).reshape(b, n, e)


def _step(fn, module, hidden, seed):
    """Output and gradients (hidden_states, every parameter of the module) under torch.manual_seed(seed)."""
    hidden = hidden.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(hidden)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    return out.detach(), torch.autograd.grad(out, [hidden] + list(module.parameters()), dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layer", [0, 1], ids=["window8", "window16"])
def test_attention_dropout_training_equals_lhattn(layer, dtype, monkeypatch):
    """Training: the patched self-attention's output and gradients equal lhattn.sliding_window_attention
    (reference backend) on the module's projections with dropout_p = attention_probs_dropout_prob and
    the same seed (drawn from torch's default generator: torch.manual_seed before each call)."""
    module = _self_attention(layer, dtype)
    module64 = copy.deepcopy(module).double()
    hidden, masks = _layer_inputs(dtype)
    masks64 = dict(masks, attention_mask=masks["attention_mask"].double())
    _forbid_hf_chunks(monkeypatch)
    got, got_grads = _step(lambda h: module(h, **masks)[0], module, hidden, 9)
    want, want_grads = _step(lambda h: _by_hand(module, h, masks), module, hidden, 9)
    want64, want64_grads = _step(lambda h: _by_hand(module64, h, masks64), module64, hidden.double(), 9)
    assert_close_to_oracle("attn_output", got, want, want64)
    names = ["hidden_states"] + [name for name, _ in module.named_parameters()]
    for name, g, r, r64 in zip(names, got_grads, want_grads, want64_grads):
        assert_close_to_oracle(f"d({name})", g, r, r64)


def test_attention_dropout_drops_per_step_and_averages_out():
    """Training drops: consecutive steps differ from each other and from eval (global rows
    included); the mean over many steps approaches the eval output (dropout is unbiased)."""
    module = _self_attention(0, torch.float32)
    hidden, masks = _layer_inputs(torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        steps = [module(hidden, **masks)[0] for _ in range(100)]
        module.eval()
        no_drop = module(hidden, **masks)[0]
    real = ~masks["is_index_masked"]  # padding rows are 0 in every mode
    one, two = steps[0][real], steps[1][real]
    # p = 0.1 keeps a whole row (9 to 17 keys, 2 heads) now and then: most rows change, not all
    for what, other in (("two training steps", two), ("training and eval", no_drop[real])):
        changed = (one - other).abs().amax(-1) > 1e-3
        assert changed.float().mean() > 0.5, f"{what}: only {int(changed.sum())} of {len(changed)} rows differ"
    glob = masks["is_index_global_attn"]
    assert (steps[0][glob] - no_drop[glob]).abs().max() > 1e-2, "global rows are not dropped"
    single = (one - no_drop[real]).abs().mean()
    mean = (torch.stack(steps).mean(0)[real] - no_drop[real]).abs().mean()
    assert mean < 0.2 * single, f"mean over 100 steps is {mean:.2e} from eval, one step {single:.2e}"


def test_bad_arguments():
    model = LongformerModel(_config())
    with pytest.raises(ValueError, match="backend"):
        patch_longformer(model, backend="cuda")
    with pytest.raises(ValueError, match="LongformerSelfAttention"):
        patch_longformer(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        patch_longformer("not a model")
