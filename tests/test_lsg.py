"""LSG attention: the oracle against lsg_converter's own LSGSelfAttention, the fallback against the
oracle (outputs, lse and every gradient), fp64 gradcheck, and bad input.

lsg_converter's package ``__init__`` imports every model file, and those do
``from transformers.models.<m>.modeling_<m> import *``, which no longer exports the embedding
classes on transformers 5.x (NameError at import).  So instead of ``import lsg_converter`` we
locate the installed package and execute just the file we need:

* ``attention_layers/lsg_self_attention.py`` imports only torch: loaded as is;
* ``bert/modeling_lsg_bert.py`` is executed in a namespace pre-filled with every public name of
  ``transformers.models.bert.modeling_bert`` (what the star import gave on transformers 4.x) and
  the ``typing`` names it relies on.  Nothing of lsg_converter is copied or modified.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
import typing

import pytest
import torch

import lhattn
from lhattn.fallback.lsg import lsg_attention as fallback_lsg
from lhattn.patterns import LSG, SPARSITY_TYPES
from lhattn.reference.lsg import lsg_attention as reference_lsg

from cases import Case, cast, make_inputs, run_with_grads
from tolerance import assert_close_to_oracle

MIN32 = torch.finfo(torch.float32).min


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- lsg_converter, loaded file by file -----------------------------------------------------------


def _exec_lsg_file(rel_path: str, prefill: dict):
    spec = importlib.util.find_spec("lsg_converter")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lsg_converter is not installed (pip install lsg-converter)")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel_path)
    fspec = importlib.util.spec_from_file_location("_lsg_" + rel_path.replace("/", "_")[:-3], path)
    mod = importlib.util.module_from_spec(fspec)
    mod.__dict__.update(prefill)
    fspec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def _attention_layers():
    return _exec_lsg_file("attention_layers/lsg_self_attention.py", {})


@functools.lru_cache(maxsize=None)
def _lsg_bert():
    modeling_bert = pytest.importorskip("transformers.models.bert.modeling_bert")
    prefill = {k: v for k, v in vars(modeling_bert).items() if not k.startswith("__")}
    prefill.update({name: getattr(typing, name) for name in ("Optional", "Tuple", "Union", "List")}, math=math)
    return _exec_lsg_file("bert/modeling_lsg_bert.py", prefill)


def _empty_groups(kpm: torch.Tensor, n: int, b: int, f: int, o: int) -> bool:
    """Whether some group of f blocked tokens (end padding included) is all padding."""
    t_pad = -(-(n - o) // b) * b
    pad = torch.ones(kpm.shape[0], t_pad, dtype=torch.bool)
    pad[:, : n - o] = kpm[:, o:]
    return bool(pad.view(kpm.shape[0], -1, f).all(-1).any())


def _mask_empty_groups(fn, f: int, mask_arg: int):
    """Wrap one of LSG's sparse-selection methods so that groups of ``f`` tokens that are all masked
    stay masked.  LSG computes that mask as a mean of finfo.min values, which overflows to -inf in
    fp32 and so *unmasks* them; lhattn keeps them masked (documented in lhattn.reference.lsg)."""

    def wrapped(*args):
        keys, values, mask = fn(*args)
        in_mask = args[mask_arg]  # [B, 1, 1, T_pad] additive mask given to LSG's selection
        bsz = in_mask.shape[0]
        empty = (in_mask.reshape(bsz, 1, -1, f) == torch.finfo(in_mask.dtype).min).all(-1)  # [B, 1, Tc]
        flat = mask.reshape(bsz, -1, empty.shape[-1]).masked_fill(empty, torch.finfo(mask.dtype).min)
        return keys, values, flat.reshape(mask.shape)

    return wrapped


def _compare_rows(name: str, got: torch.Tensor, want: torch.Tensor, keep: torch.Tensor, tol: float = 2e-5):
    err = ((got - want) * keep).abs().max().item()
    assert err <= tol, f"{name}: max |lhattn - lsg_converter| = {err:.3e} on compared rows (tol {tol})"


# ---- (1a) lsg_converter.attention_layers.LSGSelfAttention: inline layout, g = 1, sb = b ----------

# (block_size, sparsity_factor, n): b / f even and f >= 4, where that module's window is regular
# (every other factor: tests/test_lsg_exact.py); n <= 2b (full attention), n = 2b, n not a multiple
# of b, several blocks.
AL_SHAPES = [(8, 4, 13), (8, 4, 16), (8, 4, 29), (8, 4, 46), (16, 8, 57), (16, 4, 83)]
AL_TYPES = ["none", "norm", "pooling", "stride", "block_stride", "bos_pooling"]  # all it has


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity_type", AL_TYPES)
def test_reference_matches_lsg_attention_layers(sparsity_type, causal):
    al = _attention_layers()
    gen = torch.Generator().manual_seed(11)
    for (b, f, n), pad in itertools.product(AL_SHAPES, [0, 3]):
        bsz, h, d = 2, 2, 16
        q, k, v = (torch.randn(bsz, h, n, d, generator=gen) for _ in range(3))
        kpm = torch.zeros(bsz, n, dtype=torch.bool)
        kpm[1, n - pad:] = True
        module = al.LSGSelfAttention(block_size=b, sparsity_factor=f, is_causal=causal, attention_dropout_prob=0.0,
                                     sparsity_type=None if sparsity_type == "none" else sparsity_type).eval()
        if sparsity_type in ("pooling", "bos_pooling") and _empty_groups(kpm, n, b, f, 0):
            module.get_sparse_inputs = _mask_empty_groups(module.get_sparse_inputs, f, mask_arg=2)
        with torch.no_grad():
            want = module(q, k, v, torch.zeros(bsz, 1, 1, n).masked_fill(kpm[:, None, None], MIN32))
        pattern = LSG(block_size=b, sparsity_factor=f, sparsity_type=sparsity_type, num_global_tokens=1,
                      causal=causal)
        got, lse = reference_lsg(q, k, v, pattern, key_padding_mask=kpm)
        keep = ~kpm[:, None, :, None]  # LSG computes something for padding rows; lhattn gives 0
        _compare_rows(f"b={b} f={f} n={n} pad={pad}", got, want, keep)
        assert torch.all(got[~keep.expand_as(got)] == 0) and torch.isneginf(lse[1][:, kpm[1]]).all()


# ---- (1b) the LSG*Model classes' LSGSelfAttention (LSGBertConfig): prepended layout -------------

# (block_size, sparse_block_size, sparsity_factor, num_global_tokens)
BERT_CONFIGS = [(8, 8, 2, 1), (8, 4, 2, 2), (8, 16, 4, 1), (8, 4, 4, 3), (4, 4, 1, 1)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity_type", SPARSITY_TYPES)
def test_reference_matches_lsg_model_attention(sparsity_type, causal):
    """Through the module's own q/k/v projections (random weights).  The encoder pads the sequence
    to ``g + multiple of b`` and masks the padding; we feed the unpadded rows to lhattn.  Causal:
    LSG outputs the *query* on global rows, so only the other rows are compared."""
    bert = _lsg_bert()
    gen = torch.Generator().manual_seed(5)
    for (b, sb, f, g), extra, pad in itertools.product(BERT_CONFIGS, [-1, 0, 5, 3 * 8 + 1], [0, 3]):
        n = g + 2 * b + extra
        if causal and n <= 2 * b + g:
            continue  # the module's causal short-sequence path does not run (mask of the wrong width)
        bsz, h, d = 2, 2, 8
        t = -(-(n - g) // b) * b
        cfg = bert.LSGBertConfig(hidden_size=h * d, num_attention_heads=h, block_size=b, sparse_block_size=sb,
                                 sparsity_factor=f, sparsity_type=sparsity_type, num_global_tokens=g,
                                 lsh_num_pre_rounds=1 + (b == 8 and sb == 4), attention_probs_dropout_prob=0.0,
                                 is_decoder=causal)
        torch.manual_seed(0)
        module = bert.LSGSelfAttention(cfg).eval()
        pattern = LSG(block_size=b, sparse_block_size=sb, sparsity_factor=f, sparsity_type=sparsity_type,
                      num_global_tokens=g, causal=causal, lsh_num_pre_rounds=cfg.lsh_num_pre_rounds, seed=7,
                      global_layout="prepended")
        kpm = torch.zeros(bsz, g + t, dtype=torch.bool)
        kpm[:, n:] = True  # the encoder's padding to a multiple of b
        kpm[1, n - pad:] = True
        c = min(b, sb)
        bos_like = sparsity_type == "bos_pooling" or (sparsity_type == "lsh" and c // f == 1)
        if bos_like and f > 1 and _empty_groups(kpm[:, :n], n, b, f, g):
            module.get_sparse_elements = _mask_empty_groups(module.get_sparse_elements, f, mask_arg=3)
        x = torch.randn(bsz, g + t, h * d, generator=gen)
        with torch.no_grad():
            torch.manual_seed(pattern.seed)  # LSG's lsh draws its projections from the global RNG
            additive = torch.zeros(bsz, 1, 1, t).masked_fill(kpm[:, None, None, g:], MIN32)  # non-global keys
            want = module(x, attention_mask=additive)[0]
            q, k, v = (module.transpose_for_scores(proj(x))[:, :, :n]
                       for proj in (module.query, module.key, module.value))
        want = want.view(bsz, g + t, h, d).transpose(1, 2)[:, :, :n]
        got, _ = reference_lsg(q, k, v, pattern, key_padding_mask=kpm[:, :n])
        keep = ~kpm[:, None, :n, None]
        if causal:
            keep = keep.clone()
            keep[:, :, :g] = False
        _compare_rows(f"b={b} sb={sb} f={f} g={g} n={n} pad={pad}", got, want, keep)


# ---- (2) fallback against the oracle --------------------------------------------------------------

FALLBACK_CASES = [
    (Case(b=2, h=4, h_kv=4, n=37, d=16, padding=True, seed=1),  # (attention_layers' own f = 2: no sparse keys)
     dict(block_size=4, sparsity_factor=2, num_global_tokens=1, sparse_geometry="regular")),
    (Case(b=2, h=4, h_kv=2, n=45, d=16, padding=True, strided=True, seed=2),  # GQA, non-contiguous
     dict(block_size=8, sparse_block_size=4, sparsity_factor=4, num_global_tokens=2, global_layout="prepended")),
    (Case(b=1, h=2, h_kv=1, n=31, d=16, strided=True, seed=3),  # MQA, sb > b, 3 inline globals
     dict(block_size=4, sparse_block_size=8, sparsity_factor=2, num_global_tokens=3)),
    (Case(b=2, h=2, h_kv=2, n=13, d=16, padding=True, seed=4),  # n <= 2b: full attention
     dict(block_size=8, sparsity_factor=2, num_global_tokens=1)),
]


def _lsg_fn(backend: str):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, backend=backend,
                                return_lse=True)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case, spec", FALLBACK_CASES, ids=[c.id for c, _ in FALLBACK_CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity_type", SPARSITY_TYPES)
def test_fallback_matches_reference(sparsity_type, causal, case, spec, dtype):
    pattern = LSG(sparsity_type=sparsity_type, causal=causal, **spec)
    inputs = make_inputs(case, torch.float64)
    oracle = run_with_grads(_lsg_fn("reference"), inputs, pattern=pattern)
    ref_low = run_with_grads(_lsg_fn("reference"), cast(inputs, dtype), pattern=pattern)
    got = run_with_grads(_lsg_fn("fallback"), cast(inputs, dtype), pattern=pattern)
    for name in oracle:
        assert_close_to_oracle(f"{name} ({case.id}, {pattern})", got[name], ref_low[name], oracle[name])
    kpm = inputs["key_padding_mask"]
    if kpm is not None:  # padding rows: exactly 0, lse -inf, no gradient into q
        rows = kpm[:, None, :].expand(-1, case.h, -1)
        assert torch.all(got["out"][rows] == 0) and torch.all(got["dq"][rows] == 0)
        assert torch.all(torch.isneginf(got["lse"][rows]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sparsity_type", SPARSITY_TYPES)
def test_fallback_matches_reference_low_precision(sparsity_type, dtype):
    test_fallback_matches_reference(sparsity_type, False, *FALLBACK_CASES[1], dtype)


def test_fallback_plan_is_linear(monkeypatch):
    """n = 4096: every query block has at most b rows and, unless it holds global rows, at most
    3b + 2sb + g keys (global rows: b × n) -- no N × N tensor is ever formed."""
    import lhattn.fallback.lsg as fallback_module

    tiles = []
    real = fallback_module.blocked_attention

    def spy(q, sources, plan, scale, dropout=None):
        for blk in plan.blocks():
            width = sum(kb.index.stop - kb.index.start for kb in blk.keys if kb is not None)
            tiles.append((blk.rows.start, blk.rows.stop - blk.rows.start, width))
        return real(q, sources, plan, scale, dropout)

    monkeypatch.setattr(fallback_module, "blocked_attention", spy)
    n, b, sb, g = 4096, 16, 8, 2
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    out, _ = fallback_lsg(q, k, v, LSG(block_size=b, sparse_block_size=sb, sparsity_factor=4, num_global_tokens=g,
                                        sparsity_type="pooling"))
    assert out.shape == q.shape and sum(rows for _, rows, _ in tiles) == n
    assert all(rows <= b for _, rows, _ in tiles)
    assert all(width <= 3 * b + 2 * sb + g for start, _, width in tiles if start >= g)


# ---- (3) gradcheck in fp64 --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity_type", ["bos_pooling", "lsh", "norm"])
def test_fallback_gradcheck(sparsity_type):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 19, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 19, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 19, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    kpm = torch.zeros(1, 19, dtype=torch.bool)
    kpm[0, -2:] = True
    pattern = LSG(block_size=4, sparsity_factor=2, sparsity_type=sparsity_type, num_global_tokens=1)

    def f(q, k, v):
        return fallback_lsg(q, k, v, pattern, key_padding_mask=kpm)[0]

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def test_reference_gradcheck():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 15, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    pattern = LSG(block_size=4, sparsity_factor=2, sparsity_type="pooling", num_global_tokens=2, causal=True)
    assert torch.autograd.gradcheck(lambda q, k, v: reference_lsg(q, k, v, pattern)[0], (q, k, v), fast_mode=True)


# ---- lsh is reproducible ------------------------------------------------------------------------


def test_lsh_seed_is_reproducible():
    q, k, v = (torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    outs = [fallback_lsg(q, k, v, LSG(block_size=8, sparsity_type="lsh", seed=s, global_layout="prepended"))[0]
            for s in (1, 1, 2)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# ---- (4) bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=8.0), TypeError, "block_size"),
    (dict(sparse_block_size=-1), ValueError, "sparse_block_size"),
    (dict(sparsity_factor=0), ValueError, "sparsity_factor"),
    (dict(block_size=6, sparsity_factor=4), ValueError, "sparsity_factor"),
    (dict(block_size=8, sparse_block_size=6, sparsity_type="norm"), ValueError, "sparse_block_size"),
    (dict(block_size=8, sparse_block_size=2, sparsity_factor=4, sparsity_type="lsh"), ValueError,
     "sparse_block_size"),
    (dict(sparsity_type="random"), ValueError, "sparsity_type"),
    (dict(sparsity_type=None), ValueError, "sparsity_type"),
    (dict(num_global_tokens=-1), ValueError, "num_global_tokens"),
    (dict(causal=1), TypeError, "causal"),
    (dict(lsh_num_pre_rounds=-1), ValueError, "lsh_num_pre_rounds"),
    (dict(seed=-3), ValueError, "seed"),
    (dict(global_layout="appended"), ValueError, "global_layout"),
], ids=lambda x: None if isinstance(x, (dict, type)) else x)
def test_bad_lsg_pattern(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        LSG(**kwargs)


def test_lsg_pattern_accepts_no_sparse_keys_without_divisibility():
    LSG(block_size=6, sparsity_factor=4, sparsity_type="none")
    LSG(block_size=6, sparse_block_size=0, sparsity_factor=4)


def test_lsg_bad_call():
    q = k = v = torch.randn(1, 2, 20, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        lhattn.attention(q, k, v, LSG(block_size=4), key_padding_mask=torch.zeros(1, 19, dtype=torch.bool),
                         backend="fallback")
    with pytest.raises(ValueError, match="global_mask"):
        lhattn.attention(q, k, v, LSG(block_size=4), global_mask=torch.zeros(1, 20, dtype=torch.bool),
                         backend="fallback")
