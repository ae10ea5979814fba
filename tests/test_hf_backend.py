"""``attn_implementation="lhattn"`` equals ``"sdpa"`` and ``"eager"`` on the same weights.

Tiny random models (never downloaded), fp32, CPU (the fallback backend): Mistral (every layer
sliding, GQA), Qwen2 (one sliding + one full layer), Gemma 3 (sliding + full, its own scaling) and
ModernBERT (bidirectional local layers + a global layer).  Windows are small (5 or 2·4 keys) so the
lengths cover below, at and above the window; padding none / right / left.  Outputs are compared
on the real tokens, gradients of every parameter on a loss over the real tokens.
"""

import copy

import pytest
import torch

import lhattn
import lhattn.fallback
import lhattn.integrations.huggingface as lhf
from lhattn.integrations.huggingface import backend as hfb

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertModel, Gemma2Config, Gemma2Model, Gemma3TextConfig,  # noqa: E402
                          Gemma3TextModel, MistralConfig, MistralForCausalLM, MistralModel, ModernBertConfig,
                          ModernBertModel, Qwen2Config, Qwen2ForCausalLM, Qwen2Model, RobertaConfig, RobertaModel)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

OUT_RTOL, GRAD_RTOL = 1e-5, 1e-4
# Gradients that are 0 in exact arithmetic (key biases: softmax ignores a per-query shift) are rounding
# noise in both implementations; they are held to GRAD_RTOL x this fraction of the model's largest gradient.
ZERO_GRAD_FLOOR = 1e-3
SW = 5  # decoders' sliding_window: a query sees itself and the 4 previous tokens
LENGTHS = (3, SW, 12)  # below, at and above the window
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=128,
             attention_dropout=0.0)


def _mistral():
    return MistralModel(MistralConfig(num_hidden_layers=2, num_key_value_heads=2, sliding_window=SW, **SMALL))


def _qwen2():
    return Qwen2Model(Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, sliding_window=SW, use_sliding_window=True,
                                  layer_types=["sliding_attention", "full_attention"], **SMALL))


def _gemma3():
    return Gemma3TextModel(Gemma3TextConfig(num_hidden_layers=2, num_key_value_heads=2, head_dim=8, sliding_window=SW,
                                            layer_types=["sliding_attention", "full_attention"], **SMALL))


def _modernbert():  # local_attention = 8: |q - kv| <= 4; layers 0 global, 1-2 local
    return ModernBertModel(ModernBertConfig(num_hidden_layers=3, local_attention=8, global_attn_every_n_layers=3,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                            sep_token_id=2, **SMALL))


MODELS = {"mistral": _mistral, "qwen2": _qwen2, "gemma3": _gemma3, "modernbert": _modernbert}


def _model(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _batch(n, padding, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, n), generator=gen)
    mask = torch.ones(2, n, dtype=torch.long)
    cut = min(2, n - 1)  # row 1 has `cut` padding tokens
    if padding == "right":
        mask[1, n - cut:] = 0
    elif padding == "left":
        mask[1, :cut] = 0
    return ids, mask


def _assert_rel(name, got, want, rtol, atol=0.0):
    got, want = got.detach(), want.detach()
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= rtol * scale + atol, f"{name}: max |lhattn - ref| = {err:.2e} > {rtol:.0e} x {scale:.2e} + {atol:.1e}"


def _run(model, impl, ids, mask, weights):
    """Outputs on the real tokens and the gradient of every parameter of sum(out * weights * mask)."""
    model.set_attn_implementation(impl)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    (out * weights * keep[..., None]).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach()[keep], grads


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_equal_to_sdpa_and_eager(name, padding):
    model = _model(name)
    for n in LENGTHS:
        ids, mask = _batch(n, padding, seed=n)
        weights = torch.randn(2, n, model.config.hidden_size, generator=torch.Generator().manual_seed(n))
        got, got_grads = _run(model, "lhattn", ids, mask, weights)
        for ref in ("sdpa", "eager"):
            want, want_grads = _run(model, ref, ids, mask, weights)
            _assert_rel(f"{name} n={n} {padding} out vs {ref}", got, want, OUT_RTOL)
            floor = GRAD_RTOL * ZERO_GRAD_FLOOR * max(float(g.abs().max()) for g in want_grads.values())
            assert got_grads.keys() == want_grads.keys()
            for k in want_grads:
                _assert_rel(f"{name} n={n} {padding} grad {k} vs {ref}", got_grads[k], want_grads[k], GRAD_RTOL, floor)


def _counting(monkeypatch):
    """Count the calls that reach lhattn's fallback sliding-window kernel, with their dropout_p."""
    calls = []
    real = lhattn.fallback.sliding_window_attention

    def counted(q, k, v, pattern, **kw):
        calls.append((pattern, kw.get("dropout_p", 0.0)))
        return real(q, k, v, pattern, **kw)
    monkeypatch.setattr(lhattn.fallback, "sliding_window_attention", counted)
    return calls


def test_lhattn_really_runs(monkeypatch):
    """Each sliding layer calls lhattn once, with the model's own window; full layers do not; dropout
    in training is the module's attention_dropout."""
    calls = _counting(monkeypatch)
    ids, mask = _batch(12, "left")
    model = _qwen2()  # layer 0 sliding, layer 1 full
    model.set_attn_implementation("lhattn")
    model.eval()(input_ids=ids, attention_mask=mask)
    assert [c[0] for c in calls] == [lhattn.SlidingWindow((SW - 1, 0))] and calls[0][1] == 0.0
    calls.clear()
    bert = _modernbert()
    bert.set_attn_implementation("lhattn")
    bert.eval()(input_ids=ids, attention_mask=mask)
    assert [c[0] for c in calls] == [lhattn.SlidingWindow((4, 4))] * 2
    calls.clear()
    model.config.attention_dropout = 0.25
    for layer in model.layers:
        layer.self_attn.attention_dropout = 0.25
    model.train()(input_ids=ids, attention_mask=mask)
    assert [c[1] for c in calls] == [0.25]


def test_register_idempotent_and_errors():
    assert lhf.register() == "lhattn" and lhf.register() == "lhattn"
    assert ALL_ATTENTION_FUNCTIONS["lhattn"] is hfb.lhattn_attention_forward
    with pytest.raises(ValueError, match="backend must be one of"):
        lhf.register(backend="cuda")
    model = _mistral()
    model.set_attn_implementation("lhattn")
    ids, mask = _batch(12, "none")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.manual_seed(0)
    gemma2 = Gemma2Model(Gemma2Config(num_hidden_layers=2, num_key_value_heads=2, head_dim=8, sliding_window=SW,
                                      attn_logit_softcapping=50.0, **SMALL))
    gemma2.set_attn_implementation("lhattn")
    with pytest.raises(NotImplementedError, match="soft-capping"):
        gemma2(input_ids=ids)
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(NotImplementedError, match="attention sinks"):  # GPT-OSS passes its sinks as s_aux
        hfb.lhattn_attention_forward(model.layers[0].self_attn, q, q, q, None, s_aux=torch.zeros(4))


@pytest.mark.parametrize("cls,config", [
    (MistralForCausalLM, MistralConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_generate_greedy_equal_to_sdpa(cls, config, monkeypatch):
    """A prompt longer than the window, left padding, 10 new tokens (the cache outgrows the window)."""
    extra = dict(use_sliding_window=True, layer_types=["sliding_attention", "full_attention"]) \
        if config is Qwen2Config else {}
    torch.manual_seed(0)
    model = cls(config(num_hidden_layers=2, num_key_value_heads=2, sliding_window=SW, pad_token_id=0,
                       bos_token_id=1, eos_token_id=None, **extra, **SMALL)).eval()
    ids, mask = _batch(9, "left")
    runs = {}
    calls = _counting(monkeypatch)
    for impl in ("sdpa", "lhattn"):
        model.set_attn_implementation(impl)
        runs[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                    pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert runs["lhattn"].sequences.shape == (2, 19)
    assert torch.equal(runs["lhattn"].sequences, runs["sdpa"].sequences)
    for step, (got, want) in enumerate(zip(runs["lhattn"].scores, runs["sdpa"].scores)):
        _assert_rel(f"{cls.__name__} logits of step {step}", got, want, OUT_RTOL)
    assert len(calls) >= 1  # the prefill of every sliding layer ran on lhattn


def _bert(cls=BertModel, config=BertConfig, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=66, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, pad_token_id=1)
    base.update(kw)
    return cls(config(**base)).eval()


@pytest.mark.parametrize("pattern,glob", [
    (lhattn.SlidingWindow((40, 40)), [5]),
    (lhattn.Segments(segment_size=40), [5]),
    (lhattn.LSG(block_size=32, num_global_tokens=1), None),  # N <= 2 * block_size: LSG is full attention
])
def test_use_pattern_full_coverage_reproduces_unpatched(pattern, glob):
    ref = _bert()
    ids, mask = _batch(30, "right")
    ids[:, 0] = 5
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    model = lhf.use_pattern(copy.deepcopy(ref), pattern, global_token_ids=glob)
    assert model.config._attn_implementation == "lhattn"
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    _assert_rel(f"use_pattern {pattern}", got[keep], want[keep], OUT_RTOL)
    lhf.clear_pattern(model)
    assert not any(hasattr(m, hfb._PATTERN_ATTR) for m in model.modules())


def test_use_pattern_modernbert_global_layers_and_globals(monkeypatch):
    """layers='full' leaves the native local layers alone; global tokens change the windowed result."""
    ref = _modernbert()
    ids, mask = _batch(12, "none")
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    calls = _counting(monkeypatch)
    model = lhf.use_pattern(copy.deepcopy(ref), lhattn.SlidingWindow((12, 12)), layers="full")
    _assert_rel("modernbert full-coverage global layer", model(input_ids=ids, attention_mask=mask).last_hidden_state,
                want, OUT_RTOL)
    assert sorted(c[0].left for c in calls) == [4, 4, 12]
    narrow = lhf.use_pattern(copy.deepcopy(ref), lhattn.SlidingWindow((1, 1)), global_token_ids=[int(ids[0, 3])])
    with_globals = narrow(input_ids=ids).last_hidden_state
    lhf.use_pattern(narrow, lhattn.SlidingWindow((1, 1)))
    assert not torch.allclose(with_globals, narrow(input_ids=ids).last_hidden_state)


def test_use_pattern_errors():
    with pytest.raises(TypeError, match="pattern must be"):
        lhf.use_pattern(_bert(), (4, 4))
    with pytest.raises(ValueError, match="global_token_ids is not used by LSG"):
        lhf.use_pattern(_bert(), lhattn.LSG(block_size=8), global_token_ids=[5])
    with pytest.raises(ValueError, match="layers must be"):
        lhf.use_pattern(_bert(), lhattn.SlidingWindow(4), layers="some")
    with pytest.raises(NotImplementedError, match="cross-attention"):
        lhf.use_pattern(_bert(is_decoder=True, add_cross_attention=True), lhattn.SlidingWindow(4))
    model = lhf.use_pattern(_bert(), lhattn.SlidingWindow(4), global_token_ids=[5])
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match="no absolute position embedding"):
        lhf.to_long(_mistral(), 4096)


def test_to_long_copies_positions_and_reads_4096_tokens():
    roberta = _bert(RobertaModel, RobertaConfig)  # padding_idx 1: positions start at 2, 64 trained rows
    old = roberta.embeddings.position_embeddings.weight.detach().clone()
    lhf.to_long(roberta, 258)
    new = roberta.embeddings.position_embeddings.weight.detach()
    assert new.shape == (258, 32) and roberta.config.max_position_embeddings == 258
    assert torch.equal(new[:2], old[:2]) and torch.equal(new[2 + 64 * 3:], old[2:])
    assert torch.equal(new[2:].view(4, 64, 32), old[2:].expand(4, 64, 32))

    model = lhf.to_long(_bert(), 4096)
    lhf.use_pattern(model, lhattn.SlidingWindow((16, 16)), global_token_ids=[5])
    ids = torch.randint(6, 97, (1, 4096), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 5
    out = model(input_ids=ids).last_hidden_state
    assert out.shape == (1, 4096, 32) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_chunked_prefill_with_cache_equal_to_sdpa(name, monkeypatch):
    """A second multi-token chunk on a cache that outgrew the window: its queries are the last keys,
    so lhattn runs it (queries padded in front); the keys before the window are not attended."""
    from transformers import DynamicCache
    model = _model(name)
    ids, mask = _batch(16, "left")
    outs = {}
    calls = _counting(monkeypatch)
    for impl in ("sdpa", "lhattn"):
        model.set_attn_implementation(impl)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache, use_cache=True)
        outs[impl] = model(input_ids=ids[:, 9:], attention_mask=mask, past_key_values=cache,
                           use_cache=True).last_hidden_state
    _assert_rel(f"{name} second chunk", outs["lhattn"], outs["sdpa"], OUT_RTOL)
    sliding = getattr(model.config, "layer_types", ["sliding_attention"] * 2).count("sliding_attention")
    assert len(calls) == 2 * sliding  # both chunks of every sliding layer ran on lhattn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_tolerance_rule(dtype):
    """bf16 / fp16 Mistral (GQA, window 5, 12 tokens, left padding): lhattn's error against the fp64
    sdpa model is within the rule of tests/tolerance.py relative to sdpa's own error in that dtype."""
    from tolerance import assert_close_to_oracle
    ids, mask = _batch(12, "left")
    keep = mask.bool()
    outs = {}
    for impl, dt in (("sdpa", torch.float64), ("sdpa", dtype), ("lhattn", dtype)):
        model = _model("mistral").to(dt)
        model.set_attn_implementation(impl)
        outs[impl, dt] = model(input_ids=ids, attention_mask=mask).last_hidden_state.detach()[keep]
    assert_close_to_oracle(f"mistral {dtype}", outs["lhattn", dtype], outs["sdpa", dtype],
                           outs["sdpa", torch.float64])
