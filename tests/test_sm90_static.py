"""Static sm_90 compile check (issue 11): a representative set of the Triton kernels compiles for
an H100 (``GPUTarget("cuda", 90, 32)``) with no GPU, through the real launchers' specialisation,
with 0 spill bytes and wgmma.  Runs ``python -m bench.sm90 --ci`` in a subprocess: the test
session runs Triton in its interpreter, the report must compile for real."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_reason():
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(90).path
    except Exception as exc:  # the wheel ships ptxas; a stripped install may not
        return f"Triton's ptxas for sm_90 is unavailable ({type(exc).__name__}: {exc})"
    if not path or not os.path.exists(path):
        return f"Triton's ptxas for sm_90 is missing (triton {triton.__version__})"
    return None


@pytest.mark.skipif(_ptxas_reason() is not None, reason=str(_ptxas_reason()))
def test_representative_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "bench.sm90", "--ci", "--no-reference", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = json.loads((tmp_path / "sm90.json").read_text())["records"]
    kernels = {r["kernel"] for r in records}
    assert {"sw_fwd", "sw_bwd_dkdv", "seg_bwd_dkdv"} <= kernels, kernels
    for r in records:
        where = f"{r['kernel']} {r.get('config')} {r['dtype']} D={r['head_dim']}"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["spill_bytes"] == 0, f"{where}: {r['spill_bytes']} spill bytes"
        assert 0 < r["regs"] <= 255, where
        assert r["mma"] == "wgmma", f"{where}: {r['mma']}"
        assert r["warps_per_sm"] >= r["num_warps"], where
        assert r["unmasked_instr_per_tile"] > 0 and r["masked_instr_per_tile"] >= r["unmasked_instr_per_tile"], where
        assert r["int_div_in_loops"] == 0, f"{where}: {r['int_div_in_loops']} integer divides inside a loop"


def test_ptx_integer_divide_scan():
    """The report's divide scan: integer div/rem inside a label ... backward-branch region count,
    outside it or on floats they do not.  (In a subprocess: bench.sm90 refuses the interpreter.)"""
    ptx = "\n".join([
        "\tdiv.s32 \t%r1, %r2, %r3;",            # before any loop
        "$L__BB0_1:",
        "\tdiv.rn.f32 \t%f1, %f2, %f3;",         # float divide: not counted
        "\trem.u64 \t%rd1, %rd2, %rd3;",         # in the loop
        "\tsetp.lt.s32 \t%p1, %r4, %r5;",
        "\t@%p1 bra \t$L__BB0_1;",
        "$L__BB0_2:",
        "\tdiv.u32 \t%r6, %r7, %r8;",            # after the loop, jumped to forward only
        "\tbra.uni \t$L__BB0_3;",
        "$L__BB0_3:",
        "\tret;",
    ])
    code = ("import json, sys; from bench.sm90 import ptx_int_divides as f; p = sys.stdin.read(); "
            "print(json.dumps([f(p), f(p.replace('rem.u64', 'mul.lo.s64'))]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], input=ptx, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    with_rem, without = json.loads(res.stdout)
    assert with_rem == dict(int_div=3, int_div_in_loops=1)
    assert without == dict(int_div=2, int_div_in_loops=0)


# ---- LHATTN_AUTOTUNE_CONFIGS: the short tuning set of bash bench/gpu_check.sh OUT quick ----------


def test_autotune_knob_keeps_the_first_kept_configs(monkeypatch):
    import triton
    import triton.language as tl

    from kernels._core import limit_autotuners

    @triton.jit
    def _k(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))

    configs = [triton.Config({"BLOCK": b}) for b in (64, 32, 16, 8)]
    tuner = triton.autotune(configs=configs, key=[], prune_configs_by={
        "early_config_prune": lambda cfgs, nargs, **kw: [c for c in cfgs if c.kwargs["BLOCK"] != 32]})(_k)
    module = type("M", (), {})()
    module.__dict__["tuner"] = tuner
    limit_autotuners(module)
    limit_autotuners(module)  # idempotent: wrapped once
    tuner.nargs = {}

    def kept():
        return [c.kwargs["BLOCK"] for c in tuner.prune_configs({})]
    monkeypatch.delenv("LHATTN_AUTOTUNE_CONFIGS", raising=False)
    assert kept() == [64, 16, 8]  # the family's own pruner, untouched
    monkeypatch.setenv("LHATTN_AUTOTUNE_CONFIGS", "2")
    assert kept() == [64, 16]
    monkeypatch.setenv("LHATTN_AUTOTUNE_CONFIGS", "0")
    assert kept() == [64, 16, 8]
    monkeypatch.setenv("LHATTN_AUTOTUNE_CONFIGS", "few")
    with pytest.raises(ValueError, match="LHATTN_AUTOTUNE_CONFIGS.*'few'"):
        kept()
    monkeypatch.setenv("LHATTN_AUTOTUNE_CONFIGS", "-1")
    with pytest.raises(ValueError, match="LHATTN_AUTOTUNE_CONFIGS.*'-1'"):
        kept()


def test_lsg_tile_counter_by_hand():
    """bench.tiles on a shape counted by hand: n = 64, block 16, factor 2 (s = 8), sparse block 8, one
    global token, interpreter blocks 16x16 (an LSG block per program), dense passes on 40-key chunks.
    Forward, per LSG block t (rows, local tiles / useful, compressed tiles / useful, global 16-key
    tile / useful): t=0 rows 1..15: 2 / 15·32, right [16, 24) 1 / 15·8; t=1: 3 / 16·48, right
    [24, 32) 1 / 16·8; t=2: 3 / 16·48, left [0, 8) 1 / 16·8, 1 / 16; t=3: 2 / 16·32, left [8, 16)
    1 / 16·8, 1 / 16.  (Blocks 0 and 1: the aligned band (BLOCK_ALIGN) starts at tile 0, so its first
    tile holds the global key and no separate global tile runs.)  The global row (a 16-row tile): keys [0, 40) in 3 tiles (0, 16,
    and the partial 32), [40, 64) in 2 (40, and the partial 56), 1 useful row each.  The useful pairs
    are the reference's mask entries, and the backward (dq + dk/dv) computes each of them twice."""
    import torch
    from bench.tiles import count, record_lsg
    from lhattn import LSG
    from lhattn.reference.lsg import lsg_direct_mask, lsg_sparse_masks

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the hand count uses the interpreter's 16x16 blocks and 40-key chunks")
    res = count(record_lsg(64, batch=1, heads=1, head_dim=16, dtype=torch.float32, block_size=16,
                           sparse_block_size=8, sparsity_factor=2, num_global_tokens=1))
    fwd_lsg = res["kernels"]["_lsg_fwd_kernel"]
    assert (fwd_lsg.tiles, fwd_lsg.capacity) == (16, 16 * 256)
    assert fwd_lsg.useful == (15 * 32 + 15 * 8) + (16 * 48 + 16 * 8) + (16 * 48 + 16 * 8 + 16) \
        + (16 * 32 + 16 * 8 + 16)
    dense = res["kernels"]["_lsg_global_rows_fwd_kernel"]
    assert (dense.tiles, dense.capacity, dense.useful) == (5, 5 * 256, 64)
    assert res["fwd"].useful == 3128 and res["fwd"].capacity == 4096 + 1280
    pattern = LSG(block_size=16, sparse_block_size=8, sparsity_factor=2, num_global_tokens=1,
                  sparse_geometry="regular")
    left, right = lsg_sparse_masks(64, 32, pattern)
    assert res["fwd"].useful == int(lsg_direct_mask(64, pattern).sum() + left.sum() + right.sum())
    assert res["bwd"].useful == 2 * res["fwd"].useful
    # causal (the left window only, j <= i): the same identities
    res = count(record_lsg(64, batch=1, heads=1, head_dim=16, dtype=torch.float32, block_size=16,
                           sparse_block_size=8, sparsity_factor=2, num_global_tokens=1, causal=True))
    pattern = LSG(block_size=16, sparse_block_size=8, sparsity_factor=2, num_global_tokens=1,
                  sparse_geometry="regular", causal=True)
    left, right = lsg_sparse_masks(64, 32, pattern)
    assert int(right.sum()) == 0
    assert res["fwd"].useful == int(lsg_direct_mask(64, pattern).sum() + left.sum())
    assert res["bwd"].useful == 2 * res["fwd"].useful


def test_compare_joins_reports_and_lists_what_changed():
    """``python -m bench.sm90 --compare``: records joined on family/variant/kernel/dtype/D (a kernel launched
    twice joins by order), the issue's totals, one row per changed record.  (In a subprocess, as above.)"""
    def rec(kernel, regs, m, u, spill=0, warps=8, config="128x64/8w/3s"):
        return dict(family="sliding_window", variant="base", kernel=kernel, dtype="bfloat16", head_dim=64,
                    config=config, regs=regs, spill_bytes=spill, warps_per_sm=warps, mma="wgmma",
                    masked_instr_per_tile=m, unmasked_instr_per_tile=u)
    before = [rec("sw_fwd", 131, 430, 298), rec("sum_partial_rows", 40, None, None),
              rec("sum_partial_rows", 42, None, None), rec("sw_bwd_dq", 170, 350, 270, spill=16)]
    after = [rec("sw_fwd", 128, 373, 298, warps=16), rec("sum_partial_rows", 40, None, None),
             rec("sum_partial_rows", 42, None, None), rec("sw_bwd_dq", 170, 350, 270)]
    code = ("import json, sys; from bench.sm90 import compare; b, a = json.load(sys.stdin); "
            "print(compare(b, a, title='t'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps([before, after]), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    md = res.stdout
    assert "4 records joined" in md and "2 changed" in md, md
    assert "- spilling: 1 → 0 records, 16 → 0 B" in md, md
    assert "- masked tile > 1.3x its unmasked one: 1 → 0" in md, md
    assert "- warps/SM: higher in 1, lower in 0" in md, md
    rows = [line for line in md.splitlines() if line.startswith("| sliding_window/")]
    assert len(rows) == 2, rows
    assert "| 131 → 128 |" in rows[0] and "| 8 → 16 |" in rows[0] and "| 1.44 → 1.25 |" in rows[0], rows[0]
    assert "| 16 → 0 |" in rows[1], rows[1]


# ---- the tuning calibrated per Triton release (kernels/_launch.py, _TUNED_FOR_3_9) -----------------


@pytest.mark.parametrize("tuned_for_3_9", [True, False])
def test_pruner_calibration_by_triton_release(monkeypatch, tuned_for_3_9):
    """Triton 3.9's calibration, or the older releases' one (measured on Triton 3.6, the GPU machine's):
    a register cap on the sliding-window / segment forward's 128x64/8w tile at D = 64 without dropout
    only before 3.9, and a 32x32/4w dq tile at D = 256 instead of 64x16/4w (which spills there)."""
    from kernels import _launch

    monkeypatch.setattr(_launch, "_TUNED_FOR_3_9", tuned_for_3_9)
    fwd = _launch._pruner("fwd", cap_d64=True)

    def kept(prune, d, dropout=False):  # [(BLOCK_M, BLOCK_N, warps, stages, maxnreg)]
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg)
                for c in prune(_launch._fwd_configs(), {"HEAD_DIM": d, "DROPOUT": dropout})]

    d64 = kept(fwd, 64)
    assert d64[0] == (128, 64, 8, 3, None if tuned_for_3_9 else _launch._FWD_D64_REG_CAP)
    assert all(c[4] is None for c in d64[1:])  # only that tile is capped
    assert [c[:4] for c in d64] == [c[:4] for c in kept(_launch._pruner("fwd"), 64)]  # same candidates
    assert all(c[4] is None for c in kept(fwd, 64, dropout=True))  # dropout: no cap (it would spill)
    assert all(c[4] is None for c in kept(fwd, 128))
    assert all(c[4] is None for c in kept(_launch._pruner("fwd"), 64))  # LSG and dq never ask for it
    dq256 = _launch._pruner("dq")(_launch._fwd_configs(), {"HEAD_DIM": 256})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in dq256] == \
        [(64, 16, 4) if tuned_for_3_9 else (32, 32, 4)]
    lsg_dq256 = _launch._pruner("dq", d256=_launch._LSG_D256_SHAPES)(_launch._fwd_configs(), {"HEAD_DIM": 256})
    assert (lsg_dq256[0].kwargs["BLOCK_M"], lsg_dq256[0].kwargs["BLOCK_N"]) == ((64, 16) if tuned_for_3_9 else (32, 32))


def test_triton_version_parsed():
    import triton
    from kernels._launch import TRITON_VERSION, _TUNED_FOR_3_9

    assert TRITON_VERSION == tuple(int(p) for p in triton.__version__.split(".")[:2])
    assert _TUNED_FOR_3_9 == (TRITON_VERSION >= (3, 9))
