"""``from_lsg_checkpoint``: LSG-RoBERTa / LSG-BERT / LSG-XLM-R checkpoints on lhattn equal
lsg_converter's own model classes; plain checkpoints are converted as ``LSGConverter`` does.

The reference outputs were computed once by lsg_converter 0.1.9 under transformers 4.44.2 (its model
files do not import on transformers 5) and are committed with the tiny random checkpoints and the
script that regenerates them: tests/fixtures/lsg/make_fixtures.py.  Each case loads a checkpoint
with LSG settings given at load time (as LSG's ``from_pretrained(path, sparsity_type=...)``) and
compares, on non-padding tokens, ``last_hidden_state``, ``pooler_output`` (BERT) and the
sequence-classification logits: max |lhattn - LSG| <= 1e-5 * max |LSG| per tensor (fp32).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import lhattn

transformers = pytest.importorskip("transformers")
from lhattn.integrations.huggingface import from_lsg_checkpoint  # noqa: E402
from lhattn.integrations.huggingface.lsg import LSGSelfAttention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "lsg")
RTOL = 1e-5


@pytest.fixture(scope="module")
def expected():
    return torch.load(os.path.join(FIXTURES, "expected.pt"), weights_only=True)


def _case_names():
    # read without the fixture so that pytest can parametrize by name
    return sorted(torch.load(os.path.join(FIXTURES, "expected.pt"), weights_only=True)["cases"])


def _rel_err(got: torch.Tensor, want: torch.Tensor, keep=None) -> float:
    if keep is not None:
        got, want = got * keep, want * keep
    return float((got - want).abs().max() / want.abs().max())


@torch.no_grad()
def _outputs(model, inputs):
    """(base model output, logits) from one forward of the head (a hook keeps the base output)."""
    seen = {}
    base = getattr(model, model.base_model_prefix)
    handle = base.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out))
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return seen["out"], logits


def _check(name, model, inputs, want):
    out, logits = _outputs(model, inputs)
    keep = inputs["attention_mask"][..., None].to(out.last_hidden_state.dtype)
    errs = {"last_hidden_state": _rel_err(out.last_hidden_state, want["last_hidden_state"], keep),
            "logits": _rel_err(logits, want["logits"])}
    if "pooler_output" in want:
        errs["pooler_output"] = _rel_err(out.pooler_output, want["pooler_output"])
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, f"{name}: relative error vs lsg_converter {bad} > {RTOL}"
    return out


# ---- LSG checkpoints against lsg_converter's model classes ------------------------------------------


@pytest.mark.parametrize("name", _case_names())
def test_matches_lsg_converter(name, expected):
    case = expected["cases"][name]
    model = from_lsg_checkpoint(os.path.join(FIXTURES, case["checkpoint"]), **case["settings"])
    assert type(model).__name__.endswith("ForSequenceClassification")  # from the checkpoint's architectures
    assert isinstance(model, transformers.PreTrainedModel) and not model.training
    attn = [m for m in model.modules() if isinstance(m, LSGSelfAttention)]
    assert len(attn) == model.config.num_hidden_layers
    assert all(m.pattern.global_layout == "prepended" for m in attn)
    inputs = expected["inputs"][case["inputs"]]
    out = _check(name, model, inputs, case["outputs"])
    assert out.last_hidden_state.shape == inputs["input_ids"].shape + (model.config.hidden_size,)


def test_reference_backend(expected):
    """The fallback runs above ('auto' on CPU); the dense oracle agrees too."""
    case = expected["cases"]["bert"]
    model = from_lsg_checkpoint(os.path.join(FIXTURES, "bert"), backend="reference")
    _check("bert (reference)", model, expected["inputs"][case["inputs"]], case["outputs"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the interpreter takes ~20 s here)")
@pytest.mark.parametrize("name", ["bert", "roberta_bos_pooling", "xlm_roberta"])
def test_triton_backend_on_gpu(name, expected):
    case = expected["cases"][name]
    model = from_lsg_checkpoint(os.path.join(FIXTURES, case["checkpoint"]), backend="triton",
                                **case["settings"]).cuda()
    pattern = next(m for m in model.modules() if isinstance(m, LSGSelfAttention)).pattern
    reason = lhattn.triton_unavailable_reason(torch.randn(1, 2, 8, 16, device="cuda"), pattern)
    assert reason is None, reason
    inputs = {k: v.cuda() for k, v in expected["inputs"][case["inputs"]].items()}
    want = {k: v.cuda() for k, v in case["outputs"].items()}
    _check(f"{name} (triton)", model, inputs, want)


def test_pytorch_model_bin(expected, tmp_path):
    """Released LSG checkpoints are pytorch_model.bin files (older ones also hold position_ids)."""
    from safetensors.torch import load_file

    case = expected["cases"]["roberta"]
    state = load_file(os.path.join(FIXTURES, "roberta", "model.safetensors"))
    state["roberta.embeddings.position_ids"] = torch.arange(66)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(os.path.join(FIXTURES, "roberta", "config.json"), tmp_path / "config.json")
    _check("roberta (.bin)", from_lsg_checkpoint(tmp_path), expected["inputs"][case["inputs"]], case["outputs"])


def test_dtype_float64(expected):
    """Loaded in fp64, the model matches LSG's fp32 outputs to LSG's own fp32 rounding."""
    case = expected["cases"]["roberta_bos_pooling"]
    model = from_lsg_checkpoint(os.path.join(FIXTURES, "roberta"), dtype=torch.float64, **case["settings"])
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = _check("roberta_bos_pooling (fp64)", model, expected["inputs"][case["inputs"]], case["outputs"])
    assert out.last_hidden_state.dtype == torch.float64


def test_base_task_from_a_head_checkpoint(expected):
    case = expected["cases"]["xlm_roberta"]
    model = from_lsg_checkpoint(os.path.join(FIXTURES, "xlm_roberta"), task="base")
    assert type(model).__name__ == "LSGXLMRobertaModel"
    with torch.no_grad():
        out = model(**expected["inputs"][case["inputs"]])
    keep = expected["inputs"][case["inputs"]]["attention_mask"][..., None].float()
    assert _rel_err(out.last_hidden_state, case["outputs"]["last_hidden_state"], keep) <= RTOL


# ---- conversion of plain checkpoints, against LSGConverter -----------------------------------------


@pytest.mark.parametrize("name", ["plain_roberta", "plain_bert"])
def test_conversion_matches_lsg_converter(name, expected, tmp_path):
    conv = expected["plain"][name]
    model = from_lsg_checkpoint(os.path.join(FIXTURES, name), **conv["converter_args"], **conv["settings"])
    emb = getattr(model, model.base_model_prefix).embeddings
    assert torch.equal(emb.global_embeddings.weight, conv["global_embeddings"])  # all 512 rows
    assert torch.equal(emb.position_embeddings.weight, conv["position_embeddings"])
    assert model.config.max_position_embeddings == conv["position_embeddings"].shape[0]
    assert emb.position_ids.shape[-1] == emb.token_type_ids.shape[-1] == conv["position_embeddings"].shape[0]
    inputs = expected["inputs"][conv["inputs"]]
    _check(name, model, inputs, conv["outputs"])

    # saved, it is an LSG checkpoint: loads again as is (conversion arguments are refused there)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as fh:
        saved = json.load(fh)
    assert saved["architectures"][0].startswith("LSG") and saved["num_global_tokens"] == conv["settings"][
        "num_global_tokens"]
    again = from_lsg_checkpoint(tmp_path)
    _check(f"{name} (saved, reloaded)", again, inputs, conv["outputs"])
    with pytest.raises(ValueError, match="max_sequence_length"):
        from_lsg_checkpoint(tmp_path, max_sequence_length=256)


def test_conversion_ids_without_tokenizer(expected, tmp_path):
    """No tokenizer in the checkpoint: the ids must be given, and then give the same model."""
    src = os.path.join(FIXTURES, "plain_roberta")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    conv = expected["plain"]["plain_roberta"]
    with pytest.raises(ValueError, match="bos_token_id"):
        from_lsg_checkpoint(tmp_path, **conv["converter_args"], **conv["settings"])
    model = from_lsg_checkpoint(tmp_path, bos_token_id=0, mask_token_id=4, **conv["converter_args"],
                                **conv["settings"])
    assert torch.equal(model.roberta.embeddings.global_embeddings.weight, conv["global_embeddings"])


def test_conversion_short_position_table(tmp_path):
    """Fewer than 512 positions: the converter's random rows come from ``seed`` (reproducible)."""
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=40)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path)
    kw = dict(bos_token_id=2, mask_token_id=4, max_sequence_length=100, block_size=4, sparse_block_size=4,
              global_positional_stride=64)
    a, b, c = (from_lsg_checkpoint(tmp_path, seed=s, **kw) for s in (0, 0, 1))
    wa, wb, wc = (m.embeddings.global_embeddings.weight for m in (a, b, c))
    pos = a.embeddings.position_embeddings.weight
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    # global 0 = position 0 + [CLS] + token type 0 (use_token_ids); global 1 = position 64 (a random row)
    words, types = a.embeddings.word_embeddings.weight, a.embeddings.token_type_embeddings.weight
    torch.testing.assert_close(wa[0], pos[0] + words[2] + types[0])
    assert torch.equal(wa[8, :], wc[8, :])  # global 8 = position 1: no random part
    assert pos.shape[0] == 100 and torch.equal(pos[40:80], pos[:40])
    with torch.no_grad():
        out = a(input_ids=torch.randint(5, 50, (1, 30)))
    assert out.last_hidden_state.shape == (1, 30, 16) and torch.isfinite(out.last_hidden_state).all()


# ---- training ----------------------------------------------------------------------------------------


def test_training_step_reaches_global_tokens(expected):
    model = from_lsg_checkpoint(os.path.join(FIXTURES, "roberta"), sparsity_type="pooling").train()
    model.config.attention_probs_dropout_prob = 0.1
    for m in model.modules():
        if isinstance(m, LSGSelfAttention):
            m.dropout.p = 0.1
    inputs = expected["inputs"]["roberta/padded"]
    torch.manual_seed(0)
    loss = model(**inputs, labels=torch.tensor([0, 2])).loss
    loss.backward()
    grad = model.roberta.embeddings.global_embeddings.weight.grad
    g = model.config.num_global_tokens
    assert torch.isfinite(loss) and grad[:g].abs().sum() > 0 and torch.all(grad[g:] == 0)
    q_grad = model.roberta.encoder.layer[0].attention.self.query.weight.grad
    assert q_grad is not None and torch.isfinite(q_grad).all() and q_grad.abs().sum() > 0


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(sparsity_type="random"), ValueError, "sparsity_type='random'"),
    (dict(block_size=6, sparse_block_size=6), ValueError, "= 3 is odd"),
    (dict(block_size=8, sparsity_factor=3), ValueError, "must divide block_size"),
    (dict(num_global_tokens=0), ValueError, "num_global_tokens"),
    (dict(num_global_tokens=513), ValueError, "num_global_tokens"),
    (dict(block_size=8.0), TypeError, "block_size"),
    (dict(mask_first_token=True, sparsity_type="bos_pooling"), ValueError, "bos_pooling"),
    (dict(mask_first_token=True, pool_with_global=False), ValueError, "pool_with_global"),
    (dict(sparse_block_size=6, sparsity_type="norm"), ValueError, "sparse_block_size"),  # lhattn's rule
    (dict(window=4), TypeError, "unknown LSG setting"),
    (dict(task="causal-lm"), ValueError, "task must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(lsh_seed=-1), ValueError, "lsh_seed"),
    (dict(bos_token_id=0), ValueError, "already LSG"),
])
def test_bad_settings(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        from_lsg_checkpoint(os.path.join(FIXTURES, "roberta"), **kwargs)


def _config_copy(tmp_path, src, **changes):
    with open(os.path.join(FIXTURES, src, "config.json")) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(cfg, fh)
    return tmp_path


@pytest.mark.parametrize("changes, words", [
    (dict(is_decoder=True), "causal LSG models"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(model_type="gpt2"), "model_type 'gpt2'"),
    (dict(architectures=["LSGRobertaForCausalLM"]), "architecture 'LSGRobertaForCausalLM'"),
])
def test_bad_checkpoints(changes, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        from_lsg_checkpoint(_config_copy(tmp_path, "roberta", **changes))


def test_bad_paths_and_masks(tmp_path, expected):
    with pytest.raises(ValueError, match="config.json"):
        from_lsg_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="path"):
        from_lsg_checkpoint(3)
    model = from_lsg_checkpoint(os.path.join(FIXTURES, "roberta"))
    inputs = dict(expected["inputs"]["roberta/padded"])
    inputs["attention_mask"] = inputs["attention_mask"][:, None, None, :]
    with pytest.raises(ValueError, match="attention_mask"):
        model(**inputs)
