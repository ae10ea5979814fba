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
