"""Context parallelism (lhattn.distributed) against the single-process call, on 2, 3 and 4 gloo ranks.

Each world size is one spawn: every rank builds the same full inputs from one seed, runs the
single-process fallback call on the whole sequence and the context-parallel call on its shard, and
writes the largest differences (outputs and input gradients) of every case to a JSON file that the
test then checks: fp64 <= 1e-9, fp32 <= 1e-5.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lhattn
import lhattn.nn
from lhattn.distributed import context_parallel_attention, count_bytes
from tolerance import max_err

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}

SHARDS = {2: [13, 7], 3: [9, 4, 11], 4: [6, 3, 8, 5]}  # uneven; some shorter than the windows below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(x, sizes, rank, dim):
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


# LSG cases, each run in both sparse geometries; the comments give the reference windows
# (LSG.sparse_windows()), which are one-sided, shifted or overlapping where the regular ones are not
_LSG_CASES = {
    # inline f=3: ((-8, -2), none) -- one-sided, non-causal
    "lsg_norm_padding_dropout": (dict(block_size=6, sparsity_factor=3, sparsity_type="norm", num_global_tokens=2),
                                 dict(padding=3, dropout=0.2)),
    # s=1, causal: the left window only, ((-4, -1), none) in both geometries
    "lsg_pooling_causal_prepended_gqa": (dict(block_size=3, sparsity_factor=3, causal=True, sparsity_type="pooling",
                                              num_global_tokens=2, global_layout="prepended"), dict(heads=(4, 2))),
    "lsg_lsh": (dict(block_size=4, sparse_block_size=4, sparsity_type="lsh", num_global_tokens=1,
                     global_layout="prepended"), dict(padding=2)),
    # s=1: ((-4, -1), (0, 3)) -- the right window shifted next to the block (regular (2, 5))
    "lsg_stride_fp32": (dict(block_size=2, sparse_block_size=3, sparsity_type="stride", num_global_tokens=1,
                             global_layout="prepended"), dict(dtype=torch.float32, dropout=0.1)),
    # f=1: ((4, 6), (0, 2)) -- both windows inside the local ones, the "left" one to the right
    "lsg_f1_overlapping": (dict(block_size=6, sparse_block_size=2, sparsity_factor=1, sparsity_type="pooling",
                                num_global_tokens=1, global_layout="prepended"), dict(padding=2)),
    # f=1: (none, (-4, -2)) -- one-sided, the "right" window behind the block
    "lsg_f1_one_sided_dropout": (dict(block_size=4, sparse_block_size=2, sparsity_factor=1, sparsity_type="norm",
                                      num_global_tokens=2, global_layout="prepended"), dict(dropout=0.2)),
}


# name -> pattern, dtype, heads (H, H_kv), globals (positions), padding (count at the end), dropout, segment ids
def _cases(world):
    n = sum(SHARDS[world])
    s = SHARDS[world]
    b0, b1 = s[0], min(s[0] + s[1], n - 1)  # the first two shard boundaries (the end for 2 ranks)
    cases = {
        "window": dict(pattern=lhattn.SlidingWindow((3, 2))),
        "causal_dilated_gqa": dict(pattern=lhattn.SlidingWindow(4, dilation=2, causal=True), heads=(4, 2)),
        "wide_window_globals_padding": dict(pattern=lhattn.SlidingWindow((7, 9)), globals=[1, b0, n - 4],
                                            padding=3),
        "globals_padding_dropout": dict(pattern=lhattn.SlidingWindow((3, 3), dilation=2), globals=[0, b0 + 1, b1],
                                        padding=2, dropout=0.25, heads=(4, 2)),
        "wide_window_globals_padding_fp32": dict(pattern=lhattn.SlidingWindow((7, 9)), globals=[2, b1 - 1],
                                                 padding=3, dtype=torch.float32, dropout=0.1),
        "segments_fixed": dict(pattern=lhattn.Segments(5), globals=[3, b0], padding=2, dropout=0.2),
        # segment 1 spans the first boundary, segment 2 spans the whole second shard (and more)
        "segments_ragged": dict(pattern=lhattn.Segments(), segments=[b0 - 3, b1 + 2], globals=[n - 2],
                                heads=(4, 1), dropout=0.15),
        # no dropout_seed: each rank draws one from its own generator (seeded differently here); rank 0's is used
        "window_dropout_unseeded": dict(pattern=lhattn.SlidingWindow((2, 3)), dropout=0.3, unseeded=True),
        "lsg_short_full_attention": dict(pattern=lhattn.LSG(block_size=16, num_global_tokens=1, causal=True),
                                         padding=2),
    }
    for geometry in ("reference", "regular"):
        for name, (pattern, extra) in _LSG_CASES.items():
            cases[f"{name}_{geometry}"] = dict(pattern=lhattn.LSG(**pattern, sparse_geometry=geometry), **extra)
    return cases


def _inputs(case, world, seed):
    n = sum(SHARDS[world])
    dtype = case.get("dtype", torch.float64)
    h, h_kv = case.get("heads", (2, 2))
    g = torch.Generator().manual_seed(seed)
    b, d = 2, 8
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv, n, d, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv, n, d, generator=g, dtype=dtype)
    dout = torch.randn(b, h, n, d, generator=g, dtype=dtype)
    kw = {}
    if "globals" in case:
        gm = torch.zeros(b, n, dtype=torch.bool)
        gm[0, case["globals"]] = True
        gm[1, case["globals"][:1]] = True  # batch rows differ in their global count
        kw["global_mask"] = gm
    if "padding" in case:
        kpm = torch.zeros(b, n, dtype=torch.bool)
        kpm[1, n - case["padding"]:] = True  # padding in the last shard, one batch row only
        kw["key_padding_mask"] = kpm
    if "segments" in case:
        cuts = torch.tensor(case["segments"])
        ids = (torch.arange(n)[:, None] >= cuts[None, :]).sum(1)
        kw["segment_ids"] = torch.stack([ids, ids // 2 * 3])  # batch rows differ
    if case.get("dropout"):
        kw["dropout_p"], kw["dropout_seed"] = case["dropout"], None if case.get("unseeded") else 1234 + seed
    return (q, k, v), dout, kw


def _errors(case, world, rank, seed):
    """Max |difference| of this rank's output and input gradients vs the single-process call."""
    (q, k, v), dout, kw = _inputs(case, world, seed)
    sizes = SHARDS[world]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(seed)  # only used without a dropout_seed
    ref, ref_lse = lhattn.attention(*leaves, case["pattern"], backend="fallback", return_lse=True, **kw)
    ref.backward(dout)
    shard = [_split(x, sizes, rank, 2).clone().requires_grad_() for x in (q, k, v)]
    skw = {name: (_split(val, sizes, rank, 1) if torch.is_tensor(val) and name != "dropout_seed" else val)
           for name, val in kw.items()}
    torch.manual_seed(seed if rank == 0 else seed + 1000 * rank)
    out, lse = context_parallel_attention(*shard, case["pattern"], return_lse=True, **skw)
    out.backward(_split(dout, sizes, rank, 2))
    errs = {"out": (out - _split(ref, sizes, rank, 2)).abs().max().item(),
            "lse": max_err(lse, _split(ref_lse, sizes, rank, 2))}
    for name, a, r in zip("qkv", shard, leaves):
        errs["d" + name] = (a.grad - _split(r.grad, sizes, rank, 2)).abs().max().item()
    return errs


# ---- byte count ---------------------------------------------------------------------------------------

BYTES_SHARDS = [40, 33, 47]
BYTES_PATTERN = lhattn.SlidingWindow((3, 2), dilation=2)
B, H, H_KV, D = 1, 2, 1, 8


def _bytes_inputs(rank):
    n = sum(BYTES_SHARDS)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, hh, n, D, generator=g, dtype=torch.float64) for hh in (H, H_KV, H_KV))
    gm = torch.zeros(B, n, dtype=torch.bool)
    gm[0, [5, 50, 100]] = True  # one global token per shard
    kpm = torch.zeros(B, n, dtype=torch.bool)
    kpm[0, -4:] = True
    return [_split(x, BYTES_SHARDS, rank, 2).clone().requires_grad_() for x in (q, k, v)], \
        _split(gm, BYTES_SHARDS, rank, 1), _split(kpm, BYTES_SHARDS, rank, 1)


def _byte_bounds(world, g_max):
    """The issue's bound: halo = (left + right)·dilation keys (k and v, forward + their gradients back)
    plus one mask byte per halo token; collectives = O(W·G·D), independent of N."""
    p, es = BYTES_PATTERN, 8
    halo_rows = (p.left + p.right) * p.dilation
    halo = 2 * halo_rows * B * 2 * H_KV * D * es + halo_rows * B
    coll = 4 * (world - 1) * B * g_max * (H + 2 * H_KV) * (D + 2) * es + 4096
    return halo, coll


def _naive_allgather(q, k, v, gm, kpm, group=None):
    """What the halo avoids: all-gather every key and value (counted like the real traffic)."""
    from lhattn.distributed import _comm as C

    rank, sizes = dist.get_rank(), BYTES_SHARDS
    m = max(sizes)
    keep = torch.cat([torch.arange(m * t, m * t + n) for t, n in enumerate(sizes)])  # drop the padding

    def gather(x, dim):  # all_gather wants one shape on every rank: pad each shard to the longest
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, m - x.shape[dim]]
        fn = C.all_gather_rows if x.requires_grad else C.all_gather_cat
        return fn(torch.nn.functional.pad(x, pad), group, dim).index_select(dim, keep)

    qf, kf, vf = (gather(x, 2) for x in (q, k, v))
    gmf, kpmf = (gather(x, 1) for x in (gm, kpm))
    out = lhattn.attention(qf, kf, vf, BYTES_PATTERN, global_mask=gmf, key_padding_mask=kpmf, backend="fallback")
    return _split(out, sizes, rank, 2)


def _byte_counts(rank):
    res, outs = {}, []
    for name, fn in (("cp", lambda *a: context_parallel_attention(a[0], a[1], a[2], BYTES_PATTERN,
                                                                  global_mask=a[3], key_padding_mask=a[4])),
                     ("naive", _naive_allgather)):
        (q, k, v), gm, kpm = _bytes_inputs(rank)
        with count_bytes() as t:
            out = fn(q, k, v, gm, kpm)
            out.sum().backward()
        res[name] = dict(halo=t.halo, collective=t.collective, halo_received=t.halo_received)
        outs.append([out] + [x.grad for x in (q, k, v)])
    res["naive_vs_cp"] = max((a - b).abs().max().item() for a, b in zip(*outs))
    return res


# halo tokens per rank (both sides) that the module docstrings promise: Segments(S) <= 2·(S - 1);
# LSG <= 2·(2 + ceil(sb·f / b))·b (neighbour blocks plus the blocks that make the compressed keys)
OTHER_BYTES = {"segments": (lhattn.Segments(6), 2 * 5),
               "lsg": (lhattn.LSG(block_size=4, sparse_block_size=2, sparsity_type="pooling",
                                  sparse_geometry="regular"), 2 * 3 * 4),
               # reference windows ((-5, -1), (0, 4)), inside the regular span: the same bound
               "lsg_reference": (lhattn.LSG(block_size=4, sparsity_factor=4, sparsity_type="pooling",
                                            global_layout="prepended"), 2 * 6 * 4)}


def _other_byte_counts(rank):
    res = {}
    for name, (pattern, _) in OTHER_BYTES.items():
        (q, k, v), gm, kpm = _bytes_inputs(rank)
        with count_bytes() as t:
            gkw = {} if isinstance(pattern, lhattn.LSG) else {"global_mask": gm}
            context_parallel_attention(q, k, v, pattern, key_padding_mask=kpm, **gkw).sum().backward()
        res[name] = dict(halo=t.halo, collective=t.collective, halo_received=t.halo_received)
    return res


def _disagreeing_ranks(rank):
    """Rank 0 passes a key_padding_mask, rank 1 does not: both must raise the same ValueError."""
    q = torch.randn(1, 2, 5, 4)
    kpm = torch.zeros(1, 5, dtype=torch.bool) if rank == 0 else None
    try:
        context_parallel_attention(q, q, q, lhattn.SlidingWindow(2), key_padding_mask=kpm)
    except ValueError as e:
        return str(e)
    return None


# ---- nn modules and DDP ---------------------------------------------------------------------------

NN_SHARDS = [11, 6]  # 2 ranks


def _encoder(seed):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True,
                                             dtype=torch.float64)
    return lhattn.nn.replace_attention(layer, pattern=lhattn.SlidingWindow((4, 3)))


def _ddp_step(rank):
    """One SGD step of an encoder layer with the MHA drop-in: DDP over 2 context-parallel ranks vs one
    process on the whole sequence.  Returns the largest differences of the output and of the
    parameters after the step."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    from lhattn.distributed import context_parallel

    n, world = sum(NN_SHARDS), len(NN_SHARDS)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, n, 16, generator=g, dtype=torch.float64)
    target = torch.randn(2, n, 16, generator=g, dtype=torch.float64)
    kpm = torch.zeros(2, n, dtype=torch.bool)
    kpm[1, -3:] = True
    single = _encoder(0)
    model = DDP(copy.deepcopy(single))
    opt1, opt2 = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (single, model))

    y = single(x, src_key_padding_mask=kpm)
    ((y - target) ** 2).sum().backward()
    opt1.step()

    xs, ts, ks = (_split(t, NN_SHARDS, rank, 1) for t in (x, target, kpm))
    with context_parallel():
        ys = model(xs, src_key_padding_mask=ks)
    # DDP averages the ranks' gradients; each rank holds one shard's part of the sum
    (world * ((ys - ts) ** 2).sum()).backward()
    opt2.step()
    params = max((a - b).abs().max().item() for a, b in zip(single.parameters(), model.module.parameters()))
    return {"out": (ys - _split(y, NN_SHARDS, rank, 1)).abs().max().item(), "params": params}


def _hat_encoder(rank, ragged, positions="rank"):
    """A HAT encoder ("SD|S|D": segment-wise and cross-segment layers, segment position embeddings;
    segments crossing the shard boundary, a global token, padding) under ``context_parallel``: output,
    input gradient and the parameter gradients summed over ranks vs the single-process encoder."""
    from lhattn.distributed import context_parallel

    n = sum(NN_SHARDS)
    torch.manual_seed(1)
    size = None if ragged else 4
    enc = lhattn.nn.HATEncoder(16, 2, "SD|S|D", 32, dropout=0.0, segment_size=size, max_segments=8,
                               segment_positions=positions, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(global_mask=torch.zeros(2, n, dtype=torch.bool), key_padding_mask=torch.zeros(2, n, dtype=torch.bool))
    kw["global_mask"][:, 13] = True
    if positions == "absolute":  # HAT's numbering has no number for a global token
        del kw["global_mask"]
    kw["key_padding_mask"][1, -2:] = True
    if ragged:  # segment [7, 14) crosses the boundary at 11; batch row 1 differs
        ids = torch.tensor([0] * 3 + [1] * 4 + [2] * 7 + [3] * 3)
        kw["segment_ids"] = torch.stack([ids, (torch.arange(n) >= 5).long() + (torch.arange(n) >= 12).long()])
    w = torch.randn(2, n, 16, generator=g, dtype=torch.float64)  # a loss whose gradient is not ~0 after LayerNorm
    y = enc(x, **kw)
    (y * w).sum().backward()
    ref = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    xs = _split(x.detach(), NN_SHARDS, rank, 1).clone().requires_grad_()
    with context_parallel():
        ys = enc(xs, **{k: _split(v, NN_SHARDS, rank, 1) for k, v in kw.items()})
    (ys * _split(w, NN_SHARDS, rank, 1)).sum().backward()
    dparams = 0.0
    for p, r in zip(enc.parameters(), ref):
        total = torch.zeros_like(r) if p.grad is None else p.grad.clone()
        dist.all_reduce(total)  # what DDP would sum
        dparams = max(dparams, (total - r).abs().max().item())
    return {"out": (ys - _split(y, NN_SHARDS, rank, 1)).abs().max().item(),
            "dx": (xs.grad - _split(x.grad, NN_SHARDS, rank, 1)).abs().max().item(), "dparams": dparams}


def _lsg_layer(rank):
    """``LSGSelfAttention`` (learned global tokens, prepended on rank 0 only) under ``parallelize``."""
    from lhattn.distributed import is_active, parallelize

    n = sum(NN_SHARDS)
    torch.manual_seed(2)
    layer = lhattn.nn.LSGSelfAttention(16, 2, block_size=2, sparsity_factor=2, sparsity_type="pooling",
                                       num_global_tokens=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, n, dtype=torch.bool)
    kpm[0, -2:] = True
    y = layer(x, key_padding_mask=kpm)
    y.sum().backward()
    ref_grad = layer.global_embeddings.grad.clone()
    layer.zero_grad()
    xs = _split(x.detach(), NN_SHARDS, rank, 1).clone().requires_grad_()
    parallelize(layer)  # the module form of context_parallel(): every forward from now on
    ys = layer(xs, key_padding_mask=_split(kpm, NN_SHARDS, rank, 1))
    ys.sum().backward()
    grad = layer.global_embeddings.grad  # None off rank 0: the global tokens live there
    total = torch.zeros_like(ref_grad) if grad is None else grad.clone()
    dist.all_reduce(total)  # what DDP would sum
    return {"out": (ys - _split(y, NN_SHARDS, rank, 1)).abs().max().item(),
            "dx": (xs.grad - _split(x.grad, NN_SHARDS, rank, 1)).abs().max().item(),
            "dglobal": (total - ref_grad).abs().max().item(), "active_after_forward": float(is_active())}


# ---- the spawned worker ---------------------------------------------------------------------------


def _worker(rank, world, port, path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a rank that fails mid-case leaves the others waiting in a collective: let them give up soon
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    result = {}
    try:
        for i, (name, case) in enumerate(_cases(world).items()):
            result[name] = _errors(case, world, rank, seed=100 * world + i)
        if world == 3:
            result["bytes"] = _byte_counts(rank)
            result["other_bytes"] = _other_byte_counts(rank)
        if world == 2:
            result["disagree"] = _disagreeing_ranks(rank)
            result["ddp"] = _ddp_step(rank)
            result["hat"] = _hat_encoder(rank, ragged=False)
            result["hat_ragged"] = _hat_encoder(rank, ragged=True)
            result["hat_absolute"] = _hat_encoder(rank, ragged=False, positions="absolute")
            result["hat_ragged_absolute"] = _hat_encoder(rank, ragged=True, positions="absolute")
            result["lsg_layer"] = _lsg_layer(rank)
    except Exception:  # noqa: BLE001 -- reported to the test, which fails with the traceback
        result["error"] = traceback.format_exc()
    with open(os.path.join(path, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _spawn(world, tmp_path):
    # fork: the children inherit the imported modules (spawn would import torch once per rank)
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="fork")
    out = []
    for r in range(world):
        with open(tmp_path / f"rank{r}.json") as f:
            res = json.load(f)
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        out.append(res)
    return out


_RESULTS = {}


def _results(world, tmp_path_factory):
    """One spawn per world size, shared by the tests below."""
    if world not in _RESULTS:
        _RESULTS[world] = _spawn(world, tmp_path_factory.mktemp(f"world{world}"))
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_single_process(world, tmp_path_factory):
    results = _results(world, tmp_path_factory)
    failures = []
    for name, case in _cases(world).items():
        tol = TOL[case.get("dtype", torch.float64)]
        for rank, res in enumerate(results):
            for what, err in res[name].items():
                if not err <= tol:
                    failures.append(f"{name} rank {rank} {what}: {err:.3e} > {tol:.0e}")
    assert not failures, "\n".join(failures)


def test_bytes_sent_within_halo_bound(tmp_path_factory):
    world = 3  # the byte count runs in the 3-rank spawn
    results = _results(world, tmp_path_factory)
    halo, coll = _byte_bounds(world, g_max=1)
    for rank, res in enumerate(results):
        cp, naive = res["bytes"]["cp"], res["bytes"]["naive"]
        assert res["bytes"]["naive_vs_cp"] <= 1e-9  # both compute the same thing
        assert cp["halo"] > 0 and cp["halo_received"] > 0
        print(f"rank {rank}: sent {cp} (bounds: halo {halo}, collectives {coll}); all-gather-everything {naive}")
        assert cp["halo"] <= halo and cp["halo_received"] <= halo, (rank, cp, halo)
        assert cp["collective"] <= coll, (rank, cp, coll)
        # the bound is tight enough that all-gathering the keys breaks it
        assert naive["halo"] + naive["collective"] > halo + coll, (rank, naive, halo + coll)


@pytest.mark.parametrize("name", sorted(OTHER_BYTES))
def test_bytes_segments_lsg_within_halo_bound(name, tmp_path_factory):
    rows = OTHER_BYTES[name][1]
    halo = 2 * rows * B * 2 * H_KV * D * 8 + rows * B
    _, coll = _byte_bounds(3, g_max=1)
    for rank, res in enumerate(_results(3, tmp_path_factory)):
        t = res["other_bytes"][name]
        assert 0 < t["halo_received"] <= halo and t["halo"] <= halo and t["collective"] <= coll, (rank, t, halo, coll)


def test_ddp_step_matches_single_process(tmp_path_factory):
    for rank, res in enumerate(_results(2, tmp_path_factory)):
        assert res["ddp"]["out"] <= 1e-9 and res["ddp"]["params"] <= 1e-9, (rank, res["ddp"])


@pytest.mark.parametrize("case", ["hat", "hat_ragged", "hat_absolute", "hat_ragged_absolute"])
def test_hat_encoder_context_parallel(case, tmp_path_factory):
    for rank, res in enumerate(_results(2, tmp_path_factory)):
        assert max(res[case].values()) <= 1e-9, (rank, res[case])


def test_ranks_must_agree(tmp_path_factory):
    for res in _results(2, tmp_path_factory):
        assert res["disagree"] is not None and "key_padding_mask given" in res["disagree"], res["disagree"]


def test_bad_calls_raise_without_spawning():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError, match="bos_pooling"):
        context_parallel_attention(q, q, q, lhattn.LSG(block_size=3, sparsity_factor=3, sparsity_type="bos_pooling"))
    with pytest.raises(ValueError, match="global_mask is not used by LSG"):
        context_parallel_attention(q, q, q, lhattn.LSG(block_size=4), global_mask=torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="pattern must be SlidingWindow, Segments or LSG"):
        context_parallel_attention(q, q, q, "window")
    with pytest.raises(ValueError, match="segment_ids"):
        context_parallel_attention(q, q, q, lhattn.SlidingWindow(2), segment_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout_p"):
        context_parallel_attention(q, q, q, lhattn.SlidingWindow(2), dropout_p=1.5)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            context_parallel_attention(q, q, q, lhattn.SlidingWindow(2))


def test_lsg_layer_context_parallel(tmp_path_factory):
    for rank, res in enumerate(_results(2, tmp_path_factory)):
        assert max(res["lsg_layer"].values()) <= 1e-9, (rank, res["lsg_layer"])
