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
