"""Static sm_90 (H100) report of every lhattn Triton kernel, without a GPU or a driver.

    python -m bench.sm90 [--quick | --full | --variants] [--out DIR] [--family sliding_window,segment,lsg]
                         [--kernel lsg_fwd,...] [--head-dim 64,128]
    python -m bench.sm90 --compare BEFORE/sm90.json AFTER/sm90.json [--out DIR]

How: the real launchers (:mod:`kernels.sliding_window`, :mod:`kernels.segment`, :mod:`kernels.lsg`)
are called on ``meta`` tensors of a realistic shape (``B·H = 64``, ``n = 16384``, window
``(256, 256)``) with Triton's launch entry points replaced by a recorder, so every launch arrives
with exactly the arguments a GPU run would pass.  For each recorded launch, the autotuner's own
pruner gives the configs it would keep; each kept config is bound by Triton's own binder (the same
specialisation a launch does: ``== 1`` integers and strides become constants, 16-divisible ones get
the divisibility hint) and compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``.
Triton's ``ptxas -v`` log gives registers and spill bytes; ``nvdisasm`` (shipped in the Triton
wheel) the SASS, from which the inner loops are found (backward branches; innermost regions, in
program order) and their instructions counted and classified; the PTX gives the MMA kind and the
load kinds.  A dense flash-attention forward in the style of Triton's tutorial 06 (written here,
:func:`_ref_attn_fwd_kernel`) is compiled the same way as the yardstick row.

Output: ``sm90.json`` (one record per compiled variant; with the LSG family, ``meta.lsg_tiles``: the
useful-tile fraction of :mod:`bench.tiles`) and ``sm90.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be compiled, not interpreted
    raise SystemExit("bench.sm90 compiles for sm_90: unset TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

TARGET_ARCH = 90
SHAPE = dict(batch=4, heads=16, n=16384)  # B·H = 64, the static-analysis shape
WINDOW = (256, 256)

# H100 SXM per-SM limits (CUDA occupancy calculator, compute capability 9.0)
H100_SMS = 132
_REGS_PER_SM = 65536
_REG_UNIT = 256  # registers are allocated per warp in units of 256
_MAX_REGS_PER_THREAD = 255
_SMEM_PER_SM = 228 * 1024
_SMEM_PER_BLOCK = 227 * 1024
_SMEM_RESERVED_PER_BLOCK = 1024
_MAX_WARPS_PER_SM = 64
_MAX_BLOCKS_PER_SM = 32


# --------------------------------------------------------------------------------------
# the reference row: a tutorial-06-style dense flash-attention forward (our own code)
# --------------------------------------------------------------------------------------


@triton.jit
def _ref_attn_fwd_kernel(
    Q, K, V, O, stride_b, stride_h, stride_n, stride_d, n, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Dense attention forward, one ``BLOCK_M`` query tile per program, keys ``BLOCK_N`` at a time,
    exp2 online softmax, unmasked full tiles (+ a masked diagonal tile loop when ``CAUSAL``)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    base = i_bh.to(tl.int64) * stride_h
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + o_m[:, None] * stride_n + o_d[None, :] * stride_d)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = i_m * BLOCK_M if CAUSAL else n
    for j0 in range(0, hi, BLOCK_N):  # full tiles: no mask
        k = tl.load(K + base + (j0 + o_n)[None, :] * stride_n + o_d[:, None] * stride_d)  # [D, BN]
        v = tl.load(V + base + (j0 + o_n)[:, None] * stride_n + o_d[None, :] * stride_d)  # [BN, D]
        s = tl.dot(q, k)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    if CAUSAL:  # diagonal tiles: the causal mask
        for j0 in range(i_m * BLOCK_M, (i_m + 1) * BLOCK_M, BLOCK_N):
            k = tl.load(K + base + (j0 + o_n)[None, :] * stride_n + o_d[:, None] * stride_d)
            v = tl.load(V + base + (j0 + o_n)[:, None] * stride_n + o_d[None, :] * stride_d)
            s = tl.dot(q, k) * qk_scale
            s = tl.where(o_m[:, None] >= (j0 + o_n)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + base + o_m[:, None] * stride_n + o_d[None, :] * stride_d, acc.to(O.dtype.element_ty))


REFERENCE_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]
"""``(BLOCK_M, BLOCK_N, warps, stages)`` of the reference row; the first is the tutorial's yardstick
(it measured 522 SASS instructions per unmasked tile at 128x64, 4 warps, D = 64)."""


def _reference_launches(dtype: torch.dtype, head_dim: int, configs, causal: bool = False):
    b, h, n = SHAPE["batch"], SHAPE["heads"], SHAPE["n"]
    q = torch.empty((b, h, n, head_dim), dtype=dtype, device="meta")
    out = []
    for bm, bn, w, st in configs:
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        kwargs = dict(Q=q, K=q, V=q, O=q, stride_b=q.stride(0), stride_h=q.stride(1), stride_n=q.stride(2),
                      stride_d=q.stride(3), n=n, qk_scale=head_dim ** -0.5 * 1.4426950408889634,
                      HEAD_DIM=head_dim, CAUSAL=causal)
        out.append(Launch(_ref_attn_fwd_kernel, kwargs, [cfg], "reference", "causal" if causal else "base"))
    return out


# --------------------------------------------------------------------------------------
# recording the launchers' launches
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher makes it: the JIT function, its keyword arguments and the
    configs to compile (the autotuner's kept configs, or None for a plain kernel)."""
    fn: object
    kwargs: dict
    configs: Optional[list]
    family: str = ""
    variant: str = ""


@contextlib.contextmanager
def recording():
    """Replace Triton's launch entry points by a recorder (and give ``torch.cuda`` an H100's SM
    count for the launchers' split heuristics); yields the list the launches go to."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: List[Launch] = []

    def tuned_run(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.nargs = dict(zip(self.arg_names, args))
        kept = self.prune_configs(kwargs)
        self.nargs = None
        fn = self.fn
        launches.append(Launch(fn, kwargs, list(kept)))

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, kwargs, None))

    saved = (Autotuner.run, JITFunction.run, torch.cuda.get_device_properties)
    Autotuner.run = tuned_run
    JITFunction.run = jit_run
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=H100_SMS)
    try:
        yield launches
    finally:
        Autotuner.run, JITFunction.run, torch.cuda.get_device_properties = saved


def _meta(shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _drop_state():
    return _meta((2,), torch.int64)


def _sliding_window(dtype, d, variant):
    from kernels.sliding_window import sliding_window_bwd, sliding_window_fwd
    b, h, n = SHAPE["batch"], SHAPE["heads"], SHAPE["n"]
    q = _meta((b, h, n, d), dtype)
    kw: dict = dict(window=WINDOW)
    if variant == "globals":
        kw["global_keys"] = _meta((b, 64), torch.int64)
    elif variant == "dropout":
        kw.update(dropout_p=0.1, dropout_state=_drop_state())
    elif variant == "dilation":
        kw["dilation"] = 2
    elif variant == "padding":
        kw["key_mask"] = _meta((b, n), torch.bool)
    elif variant == "causal":  # SlidingWindow(256, causal=True): the band ends on the diagonal
        kw["window"] = (WINDOW[0], 0)
    elif variant == "narrow":  # a band narrower than a tile: the two-sided row test on every edge tile
        kw["window"] = (16, 16)
    elif variant == "dense":  # the global rows' pass: 64 rows see every key
        kw["window"] = None
        q = _meta((b, h, 64, d), dtype)
        k = _meta((b, h, n, d), dtype)
        out, lse = sliding_window_fwd(q, k, k, **kw)
        sliding_window_bwd(q, q, k, k, q, _meta((b, h, 64), torch.float32), **kw)
        return
    out, lse = sliding_window_fwd(q, q, q, **kw)
    kw.pop("query_mask", None)
    sliding_window_bwd(q, q, q, q, q, _meta((b, h, n), torch.float32), **kw)


def _segment(dtype, d, variant):
    from kernels.segment import segment_bwd, segment_fwd
    b, h, n = SHAPE["batch"], SHAPE["heads"], SHAPE["n"]
    q = _meta((b, h, n, d), dtype)
    kw: dict = dict(segment_size=512)
    if variant == "globals":
        kw["global_keys"] = _meta((b, 64), torch.int64)
    elif variant == "dropout":
        kw.update(dropout_p=0.1, dropout_state=_drop_state())
    elif variant == "bounds":  # per-token segment bounds (documents)
        kw = dict(segment_bounds=(_meta((b, n), torch.int64), _meta((b, n), torch.int64)))
    elif variant == "padding":
        kw["key_mask"] = _meta((b, n), torch.bool)
    segment_fwd(q, q, q, **kw)
    segment_bwd(q, q, q, q, q, _meta((b, h, n), torch.float32), **kw)


LSG_PARAMS = dict(block_size=128, sparse_block_size=128, sparsity_factor=2, num_global_tokens=1)


def _lsg(dtype, d, variant):
    from kernels.lsg import lsg_bwd, lsg_fwd
    b, h, n = SHAPE["batch"], SHAPE["heads"], SHAPE["n"]
    q = _meta((b, h, n, d), dtype)
    n_c = n // LSG_PARAMS["sparsity_factor"]
    kc = _meta((b, h, n_c, d), dtype)
    sv = _meta((b, 1, n_c), torch.bool)
    kw: dict = dict(**LSG_PARAMS)
    if variant == "causal":
        kw["causal"] = True
    elif variant == "dropout":
        kw.update(dropout_p=0.1, dropout_state=_drop_state())
    elif variant == "padding":
        kw["key_valid"] = _meta((b, n), torch.bool)
    lsg_fwd(q, q, q, kc, kc, sv, **kw)
    lsg_bwd(q, q, q, q, q, _meta((b, h, n), torch.float32), kc, kc, sv, **kw)


FAMILIES: Dict[str, Tuple[Callable, Tuple[str, ...]]] = {
    "sliding_window": (_sliding_window, ("base", "globals", "dropout", "dilation", "padding", "causal", "narrow",
                                         "dense")),
    "segment": (_segment, ("base", "globals", "dropout", "bounds", "padding")),
    "lsg": (_lsg, ("base", "causal", "dropout", "padding")),
}


def record(family: str, dtype: torch.dtype, d: int, variant: str) -> List[Launch]:
    fn, _ = FAMILIES[family]
    with recording() as launches:
        fn(dtype, d, variant)
    for launch in launches:
        launch.family, launch.variant = family, variant
    return launches


# --------------------------------------------------------------------------------------
# compiling one variant
# --------------------------------------------------------------------------------------


def _bind(fn, kwargs: dict, config: Optional[triton.Config]):
    """``(signature, constexprs, attrs, options)`` exactly as ``JITFunction.run`` builds them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton.backends.compiler import GPUTarget

    backend = make_backend(GPUTarget("cuda", TARGET_ARCH, 32))
    full = dict(kwargs)
    if config is not None:
        full.update(config.all_kwargs())
    full = {k: v for k, v in full.items() if v is not None or k in fn.arg_names}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(**full)
    options, signature, constexprs, attrs = fn._pack_args(backend, full, bound, spec, opts)
    return signature, constexprs, attrs, options


def _tool(name: str) -> Optional[str]:
    """A CUDA binary shipped in the Triton wheel (or on PATH); ``ptxas`` is the one Triton uses
    for sm_90."""
    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            return get_ptxas(TARGET_ARCH).path
        except Exception:  # no usable ptxas in the wheel
            return shutil.which("ptxas")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def compile_sm90(fn, kwargs: dict, config: Optional[triton.Config]):
    """Compile for sm_90; returns ``(kernel, ptxas log, seconds)`` (the log is rebuilt with
    ``ptxas -v`` when Triton's cache answered)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _bind(fn, kwargs, config)
    t0 = time.perf_counter()
    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", TARGET_ARCH, 32), options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    log = buf.getvalue()
    if "registers" not in log:  # cache hit: run ptxas -v on the cached PTX
        log = _ptxas_log(kernel.asm["ptx"])
    return kernel, log, time.perf_counter() - t0


def _ptxas_log(ptx: str) -> str:
    ptxas = _tool("ptxas")
    if ptxas is None:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{TARGET_ARCH}a", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        return res.stderr + res.stdout


# --------------------------------------------------------------------------------------
# analysis: ptxas log, occupancy, PTX loads/MMA, SASS loops
# --------------------------------------------------------------------------------------


def parse_ptxas(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(regs=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spill.group(1)) if spill else None,
                spill_load_bytes=int(spill.group(2)) if spill else None,
                stack_bytes=int(stack.group(1)) if stack else None)


def occupancy(regs: int, smem: int, warps: int) -> dict:
    """Resident blocks / warps per SM on an H100 and the limiting resource."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / _REG_UNIT) * _REG_UNIT
    by_regs = (_REGS_PER_SM // regs_per_warp) // warps
    by_smem = _SMEM_PER_SM // (smem + _SMEM_RESERVED_PER_BLOCK) if smem <= _SMEM_PER_BLOCK else 0
    by_warps = _MAX_WARPS_PER_SM // warps
    blocks = min(by_regs, by_smem, by_warps, _MAX_BLOCKS_PER_SM)
    limit = min((by_regs, "registers"), (by_smem, "shared memory"), (by_warps, "warps"), (_MAX_BLOCKS_PER_SM, "blocks"))
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps, occupancy_limit=limit[1])


def ptx_kinds(ptx: str) -> dict:
    """MMA kind and the global load kinds (with their widths) found in the PTX."""
    n_wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    n_mma = len(re.findall(r"\bmma\.sync", ptx))
    loads: Counter = Counter()
    for size in re.findall(r"cp\.async\.c[ag]\.shared\.global[\w:.]*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)", ptx):
        loads[f"cp.async.{int(size, 0)}B"] += 1
    loads["tma"] = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    for op in re.findall(r"\bld\.global[\w:.]*", ptx):
        vec = re.search(r"\.v(\d)", op)
        bits = re.search(r"\.[busf](\d+)\b", op)
        width = (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) if bits else 32) // 8
        loads[f"ld.global.{width}B"] += 1
    mma = "wgmma" if n_wgmma else ("mma.sync" if n_mma else "none")
    return dict(mma=mma, ptx_wgmma=n_wgmma, ptx_mma_sync=n_mma, loads={k: v for k, v in sorted(loads.items()) if v})


_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")
_PTX_INT_DIV = re.compile(r"\b(?:div|rem)\.[su](?:16|32|64)\b")


def ptx_int_divides(ptx: str) -> dict:
    """Integer divides/remainders (``div``/``rem`` on ``.s``/``.u`` types; float divides excluded) in
    the PTX: in all, and inside a loop -- between a label and a later branch back to it.  A divide by
    a constant is already a multiply/shift by then, so what is left here is a runtime divide, which
    ptxas expands to a ~20-instruction sequence."""
    lines = ptx.splitlines()
    labels, loops = {}, []
    for i, line in enumerate(lines):
        m = _PTX_LABEL.match(line)
        if m:
            labels[m.group(1)] = i
            continue
        b = _PTX_BRANCH.search(line)
        if b and labels.get(b.group(1), i + 1) <= i:
            loops.append((labels[b.group(1)], i))
    divs = [i for i, line in enumerate(lines) if _PTX_INT_DIV.search(line)]
    in_loops = sum(1 for i in divs if any(lo <= i <= hi for lo, hi in loops))
    return dict(int_div=len(divs), int_div_in_loops=in_loops)


_MIX = {
    "mma": {"HGMMA", "HMMA", "WARPGROUP", "IMMA", "DMMA"},
    "mufu": {"MUFU"},
    "fp": {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "F2F", "F2FP", "F2I", "I2F", "I2FP",
           "HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2", "DADD", "DMUL", "DFMA", "DSETP", "FRND", "FSWZADD"},
    "int": {"IADD3", "IADD", "IMAD", "LOP3", "LOP", "ISETP", "SHF", "SHL", "SHR", "LEA", "IMNMX", "SEL", "IABS",
            "IMUL", "POPC", "FLO", "PRMT", "BMSK", "SGXT", "VIADD", "VIMNMX", "IDP", "PLOP3", "P2R", "R2P", "BREV",
            "VIADDMNMX", "IMNMX3"},
    "mem": {"LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "LDGDEPBAR", "DEPBAR", "UTMALDG", "UBLKCP", "SYNCS",
            "LD", "ST", "ATOM", "ATOMS", "RED", "LDL", "STL", "LDC", "ULDC", "STSM", "UTMACCTL", "FENCE", "MEMBAR"},
}


def _mix_class(op: str) -> str:
    base = op.split(".")[0]
    for cls, ops in _MIX.items():
        if base in ops or (base.startswith("U") and base[1:] in ops):
            return cls
    return "other"


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"`\((\.L_x_\d+)\)")


def sass_instructions(cubin: bytes) -> List[Tuple[int, str, str]]:
    """``[(address, opcode, label-or-None)]`` from nvdisasm (label = the line's branch target)."""
    nvdisasm = _tool("nvdisasm")
    if nvdisasm is None:
        return []
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    out, labels = [], {}
    pending: List[str] = []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_LINE.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        b = _BRANCH.search(line)
        out.append((addr, m.group(2), b.group(1) if b else None))
    return [(a, op, labels.get(t) if t else None) for a, op, t in out]


def sass_loops(instrs: List[Tuple[int, str, Optional[int]]]) -> List[dict]:
    """Innermost loops (regions from a backward branch's target to the branch), in address order,
    each with its instruction count (NOPs excluded) and class mix."""
    regions = [(target, addr) for addr, op, target in instrs
               if target is not None and op.startswith("BRA") and target <= addr]
    inner = [r for r in regions if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in regions)]
    loops = []
    for lo, hi in sorted(set(inner)):
        ops = [op for addr, op, _ in instrs if lo <= addr <= hi and not op.startswith("NOP")]
        if len(ops) <= 2:  # the trailing `BRA self` trap
            continue
        mix = Counter(_mix_class(op) for op in ops)
        loops.append(dict(instr=len(ops), mix=dict(sorted(mix.items())),
                          mma=sum(1 for op in ops if op.startswith(("HGMMA", "HMMA")))))
    return loops


def _lsg_plan(c: dict) -> Tuple[str, ...]:
    """Local band, per compressed-key side its whole tiles (unmasked but for the validity mask) and
    its partial last tile, the global keys (no loop when ``g == 1``: the launch specialises
    ``n_global == 1`` to a constant and the loop is one tile).  The band has no leading masked loop
    when ``BLOCK_N`` divides ``BLOCK_ALIGN`` (the block size and offset: the band starts on a tile)."""
    sides = (1 if c.get("CAUSAL") else 2) if c.get("HAS_SPARSE") else 0
    aligned = c.get("BLOCK_ALIGN", 0) >= c.get("BLOCK_N", 1 << 30)
    band = ("unmasked", "masked") if aligned else _BAND3
    return band + ("sparse_full", "sparse_edge") * sides + (("global",) if c.get("n_global") != 1 else ())


# which inner loops a kernel has, in program order (before the family's extra loops)
_BAND3 = ("masked", "unmasked", "masked")
LOOP_PLAN: Dict[str, Callable[[dict], Tuple[str, ...]]] = {
    "_sw_fwd_kernel": lambda c: (("list",) + _BAND3 if c.get("HEAD_DIM") == 64 else _BAND3 + ("list",))
    if c.get("HAS_GLOBAL") else _BAND3,  # the listed keys first at D = 64
    "_sw_bwd_dq_kernel": lambda c: _BAND3 + (("list",) if c.get("HAS_GLOBAL") else ()),
    "_sw_bwd_dkdv_kernel": lambda c: _BAND3,
    "_sw_bwd_dkdv_global_kernel": lambda c: ("unmasked", "masked"),
    "_seg_fwd_kernel": lambda c: _BAND3 + (("list",) if c.get("HAS_GLOBAL") else ()),
    "_seg_bwd_dq_kernel": lambda c: _BAND3 + (("list",) if c.get("HAS_GLOBAL") else ()),
    "_seg_bwd_dkdv_kernel": lambda c: _BAND3,
    "_lsg_fwd_kernel": lambda c: _lsg_plan(c),
    "_lsg_bwd_dq_kernel": lambda c: _lsg_plan(c),
    "_lsg_bwd_dkdv_local_kernel": lambda c: _BAND3,
    "_lsg_bwd_dkdv_sparse_kernel": lambda c: _BAND3 * (1 if c.get("CAUSAL") else 2),  # per row span
    "_lsg_global_rows_fwd_kernel": lambda c: ("unmasked", "masked"),
    "_lsg_global_rows_dq_kernel": lambda c: ("unmasked", "masked"),
    "_lsg_global_rows_dkdv_kernel": lambda c: ("masked",),
    "_ref_attn_fwd_kernel": lambda c: ("unmasked", "masked") if c.get("CAUSAL") else ("unmasked",),
}


def label_loops(kernel: str, constants: dict, loops: List[dict]) -> Tuple[Optional[int], Optional[int], str]:
    """``(masked, unmasked instructions per tile, note)`` from the loops found and the kernel's
    plan: the first masked loop of the band walk (the heavier edge when there are two) and its
    unmasked loop."""
    plan = LOOP_PLAN.get(kernel)
    if plan is None or not loops:
        return None, None, "" if not loops else "no loop plan"
    labels = plan(constants)
    if len(labels) != len(loops):
        return None, None, f"expected {len(labels)} loops ({','.join(labels)}), found {len(loops)}"
    for lab, loop in zip(labels, loops):
        loop["role"] = lab
    band = [(lab, lp) for lab, lp in zip(labels, loops) if lab in ("masked", "unmasked")][:3]
    masked = [lp["instr"] for lab, lp in band if lab == "masked"]
    unmasked = [lp["instr"] for lab, lp in band if lab == "unmasked"]
    return (max(masked) if masked else None), (unmasked[0] if unmasked else None), ""


# --------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------


def _short(name: str) -> str:
    return name.strip("_").replace("_kernel", "")


def analyse(launch: Launch, config: Optional[triton.Config], dtype: torch.dtype, d: int) -> dict:
    fn = launch.fn
    rec = dict(family=launch.family, variant=launch.variant, kernel=_short(fn.__name__), dtype=str(dtype).split(".")[1],
               head_dim=d)
    if config is not None:
        rec["config"] = _config_name(config)
        if getattr(config, "maxnreg", None):
            rec["maxnreg"] = config.maxnreg
        rec["block_m"], rec["block_n"] = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        rec["num_warps"], rec["num_stages"] = config.num_warps, config.num_stages
    else:
        bm, bn = launch.kwargs.get("BLOCK_M"), launch.kwargs.get("BLOCK_N")
        rec["config"] = f"{bm}x{bn or '-'}/{launch.kwargs.get('num_warps', 4)}w (fixed)"
        rec["num_warps"] = launch.kwargs.get("num_warps", 4)
    try:
        kernel, log, secs = compile_sm90(fn, launch.kwargs, config)
    except Exception as exc:  # a variant that does not compile is a finding, not a crash
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return rec
    flags = {k: v for k, v in launch.kwargs.items()
             if k.isupper() and isinstance(v, bool) and k not in ("EXACT_SCALE", "USE_EXP2")}
    rec["flags"] = ",".join(k for k, v in sorted(flags.items()) if v) or "-"
    rec["compile_s"] = round(secs, 2)
    rec.update(parse_ptxas(log))
    if rec["spill_store_bytes"] is not None:
        rec["spill_bytes"] = rec["spill_store_bytes"] + rec["spill_load_bytes"]
    static = _static_smem(kernel.asm["cubin"])
    rec["smem_bytes"] = kernel.metadata.shared + static
    warps = kernel.metadata.num_warps
    if rec["regs"] is not None:
        rec.update(occupancy(rec["regs"], rec["smem_bytes"], warps))
    rec.update(ptx_kinds(kernel.asm["ptx"]))
    rec.update(ptx_int_divides(kernel.asm["ptx"]))
    instrs = sass_instructions(kernel.asm["cubin"])
    rec["sass_instr"] = sum(1 for _, op, _ in instrs if not op.startswith("NOP"))
    rec["sass_mma"] = sum(1 for _, op, _ in instrs if op.startswith(("HGMMA", "HMMA")))
    loops = sass_loops(instrs)
    masked, unmasked, note = label_loops(fn.__name__, {**launch.kwargs, **(config.kwargs if config else {})}, loops)
    rec["loops"] = loops
    if masked is not None:
        rec["masked_instr_per_tile"] = masked
    if unmasked is not None:
        rec["unmasked_instr_per_tile"] = unmasked
    if note:
        rec["loop_note"] = note
    return rec


def _static_smem(cubin: bytes) -> int:
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"SHARED:(\d+)", text)
    return int(m.group(1)) if m else 0


def _dedup_key(launch: Launch, config) -> str:
    sig, const, attrs, opts = _bind(launch.fn, launch.kwargs, config)
    return repr((launch.fn.__name__, sorted(sig.items()), sorted(const.items()), sorted(attrs.items()),
                 opts.num_warps, opts.num_stages, getattr(opts, "maxnreg", None)))


# --------------------------------------------------------------------------------------
# the run matrix
# --------------------------------------------------------------------------------------

QUICK = [  # (family, dtype, head dim, variant, kernels to keep (None: all), configs: an int k = the first k kept,
    #  a tuple = the kept configs whose names start with one of these)
    ("sliding_window", torch.bfloat16, 64, "base", ("sw_fwd", "sw_bwd_dq", "sw_bwd_dkdv"), 2),
    ("sliding_window", torch.bfloat16, 128, "base", ("sw_fwd", "sw_bwd_dq", "sw_bwd_dkdv"), 2),
    ("segment", torch.bfloat16, 64, "base", ("seg_fwd", "seg_bwd_dq", "seg_bwd_dkdv"), 1),
    ("lsg", torch.bfloat16, 64, "base", ("lsg_fwd", "lsg_bwd_dq", "lsg_bwd_dkdv_local", "lsg_bwd_dkdv_sparse",
                                         "lsg_global_rows_fwd", "lsg_global_rows_dq", "lsg_global_rows_dkdv"), 1),
]
"""The quick subset (a fast look): the headline configs of each family."""

CI = [
    ("sliding_window", torch.bfloat16, 64, "base", ("sw_fwd",), ("64x64/4w/3s",)),
    ("sliding_window", torch.bfloat16, 128, "base", ("sw_bwd_dkdv",), ("32x64/4w/3s",)),
    ("segment", torch.bfloat16, 64, "base", ("seg_bwd_dkdv",), ("64x64/4w/2s",)),
]
"""The CI subset (tests/test_sm90_static.py): one forward, one D = 128 backward, another family."""


def matrix(mode: str, families: Iterable[str]):
    """``[(family, dtype, d, variant, kernel filter, config filter)]`` for a mode.

    full: every kernel and every kept config at bf16, D = 64 and 128 (base variant); the first kept
    config (the autotuner's first candidate) of every kernel for fp16 (and of the kernels a family
    borrows from another one or from ``_core``) (D = 64, 128), for every flag
    variant (bf16, D = 64) and for D = 16, 32, 256 (bf16).  variants: the first kept config of every
    kernel in every flag variant, bf16 and fp16, per head dim.  The whole cartesian product (every kept
    config x dtype x head dim x flags) is ~2000 compiles: hours on a 2-core machine, so it is not a
    mode; a config filter of an int ``k`` keeps the first ``k`` kept configs of each launch."""
    if mode in ("quick", "ci"):
        return [m for m in (QUICK if mode == "quick" else CI) if m[0] in families]
    if mode == "variants":  # the flag variants at every head dim (run() restricts them to --head-dim)
        return [(fam, dt, d, v, None, 1) for d in (256, 128, 64, 32, 16) for fam in families
                for v in FAMILIES[fam][1] for dt in (torch.bfloat16, torch.float16)]
    out = []  # the most telling records first: a run cut short still has them
    for d in (64, 128):
        out += [(fam, torch.bfloat16, d, "base", None, None) for fam in families]
    out += [(fam, torch.float16, d, "base", None, 1) for d in (64, 128) for fam in families]
    out += [(fam, torch.bfloat16, 64, v, None, 1) for fam in families for v in FAMILIES[fam][1][1:]]
    out += [(fam, torch.bfloat16, d, "base", None, 1) for d in (16, 32, 256) for fam in families]
    return out


def annotate_kept(records: List[dict]) -> None:
    """Set ``kept`` on every record: whether today's pruners still keep its config (a report made
    before a pruner change stays readable: its pruned variants are listed apart)."""
    groups: Dict[tuple, set] = {}
    for r in records:
        if "error" in r or r["family"] not in FAMILIES or not r.get("block_m"):
            continue
        g = (r["family"], r["dtype"], r["head_dim"], r["variant"])
        if g not in groups:
            kept = set()
            try:
                for launch in record(g[0], getattr(torch, g[1]), g[2], g[3]):
                    for c in launch.configs or []:
                        kept.add((_short(launch.fn.__name__), _config_name(c)))
            except Exception:  # noqa: BLE001 - a launcher that no longer runs keeps nothing
                pass
            groups[g] = kept
        r["kept"] = (r["kernel"], r["config"]) in groups[g]


def _config_name(config) -> str:
    """``BMxBN/Ww/Ss``, and ``/rR`` for a config capped at ``R`` registers (``maxnreg``)."""
    cap = getattr(config, "maxnreg", None)
    return (f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}/{config.num_warps}w/{config.num_stages}s"
            + (f"/r{cap}" if cap else ""))


def run(mode: str, families: List[str], log=print, reference: bool = True,
        on_record: Optional[Callable[[List[dict], int], None]] = None, kernels_only: Optional[List[str]] = None,
        dims: Optional[List[int]] = None) -> List[dict]:
    """Record, compile and analyse the variants of ``mode``; ``on_record(records, n_jobs)`` after each.
    ``kernels_only`` (short kernel names, e.g. ``lsg_fwd``) and ``dims`` (head dims) restrict the matrix."""
    records: List[dict] = []
    seen = set()
    jobs: List[Tuple[Launch, Optional[triton.Config], torch.dtype, int]] = []
    ranks: List[int] = []  # a job's config rank among its launch's kept configs (run order)
    if reference:
        small = mode != "full"
        for d in (64, 128):
            for causal in ((False,) if small else (False, True)):
                # small modes: the yardstick, and the 8-warp tile of the headline configs at D = 64 and 128 (so
                # that the quick report checks the unmasked-tile target at the same tile and warps; the 4-warp
                # yardstick spills at D = 128)
                cfgs = REFERENCE_CONFIGS if not small else REFERENCE_CONFIGS[:2] if d == 64 else REFERENCE_CONFIGS[1:2]
                for launch in _reference_launches(torch.bfloat16, d, cfgs, causal):
                    jobs.append((launch, launch.configs[0], torch.bfloat16, d))
                    ranks.append(-1)
    for fam, dtype, d, variant, kernels, cfgs in matrix(mode, families):
        if dims is not None and d not in dims:
            continue
        try:
            launches = record(fam, dtype, d, variant)
        except Exception as exc:
            records.append(dict(family=fam, variant=variant, dtype=str(dtype).split(".")[1], head_dim=d,
                                kernel="(launcher)", error=f"{type(exc).__name__}: {exc}"))
            continue
        for launch in launches:
            if kernels is not None and _short(launch.fn.__name__) not in kernels:
                continue
            if kernels_only is not None and _short(launch.fn.__name__) not in kernels_only:
                continue
            configs = launch.configs if launch.configs is not None else [None]
            if isinstance(cfgs, int):
                configs = configs[:cfgs]
            elif mode == "full" and launch.fn.__module__ != f"kernels.{fam}":
                configs = configs[:1]  # another family's kernel (LSG's dense path): its own run has the rest
            for rank, config in enumerate(configs):
                if isinstance(cfgs, tuple) and (config is None or not any(_config_name(config).startswith(c)
                                                                          for c in cfgs)):
                    continue
                key = _dedup_key(launch, config)
                if key in seen:
                    continue
                seen.add(key)
                jobs.append((launch, config, dtype, d))
                ranks.append(rank)
    # breadth first: every kernel's first kept config before anyone's second, so that a run cut
    # short (a loaded machine) still covers every kernel; the reference rows lead
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (ranks[i], i))]
    t0 = time.perf_counter()
    for i, (launch, config, dtype, d) in enumerate(jobs):
        rec = analyse(launch, config, dtype, d)
        records.append(rec)
        log(f"[{i + 1}/{len(jobs)} {time.perf_counter() - t0:6.0f}s] {_line(rec)}")
        if on_record is not None:
            on_record(records, len(jobs))
    return records


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['family']}/{r['variant']} {r['kernel']} {r.get('config', '')} {r['dtype']} D={r['head_dim']}: " \
               f"ERROR {r['error']}"
    return (f"{r['family']}/{r['variant']} {r['kernel']} {r['config']} {r['dtype']} D={r['head_dim']}: "
            f"regs {r['regs']} spill {r.get('spill_bytes')} smem {r['smem_bytes']} warps/SM {r.get('warps_per_sm')} "
            f"{r['mma']} tile m/u {r.get('masked_instr_per_tile')}/{r.get('unmasked_instr_per_tile')} "
            f"({r['compile_s']}s)")


# --------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------


def _ratio(a, b):
    return f"{a / b:.2f}" if a and b else ""


def _same_config_ref(r: dict, refs: List[dict]) -> Optional[int]:
    """The reference row's unmasked tile at ``r``'s tile shape, warps and head dim (None: no such row)."""
    for ref in refs:
        if (ref["head_dim"], ref.get("block_m"), ref.get("block_n"), ref.get("num_warps")) == \
                (r["head_dim"], r.get("block_m"), r.get("block_n"), r.get("num_warps")):
            return ref.get("unmasked_instr_per_tile")
    return None


LSG_TILE_TARGET = 0.90
"""Issue 11's LSG target: useful-tile fraction (:mod:`bench.tiles`) at block 128, factor 2, n = 16k, one
global token."""


def lsg_tiles() -> dict:
    """:mod:`bench.tiles`' useful-tile fraction of one LSG forward + backward at :data:`LSG_PARAMS`,
    :data:`SHAPE`, D = 64, bf16 (the autotuner's first kept config of every launch)."""
    from bench.tiles import as_json, count, record_lsg
    res = as_json(count(record_lsg(SHAPE["n"], batch=SHAPE["batch"], heads=SHAPE["heads"], head_dim=64,
                                   block_size=LSG_PARAMS["block_size"],
                                   sparse_block_size=LSG_PARAMS["sparse_block_size"],
                                   sparsity_factor=LSG_PARAMS["sparsity_factor"],
                                   num_global_tokens=LSG_PARAMS["num_global_tokens"])))
    res["params"] = dict(**LSG_PARAMS, **SHAPE, head_dim=64, dtype="bfloat16")
    return res


def _tiles_line(tiles: Optional[dict]) -> List[str]:
    if not tiles:
        return []
    ok = "met" if tiles["total"]["fraction"] >= LSG_TILE_TARGET else "NOT met"
    worst = sorted(tiles["kernels"].items(), key=lambda kv: kv[1]["fraction"])[:3]
    return [f"- LSG useful-tile fraction >= {LSG_TILE_TARGET:.0%} (`python -m bench.tiles`: useful (query, key) "
            f"pairs / BLOCK_M x BLOCK_N of every executed tile, fwd + bwd, n={tiles['params']['n']}, block "
            f"{tiles['params']['block_size']}, factor {tiles['params']['sparsity_factor']}, "
            f"{tiles['params']['num_global_tokens']} global token, D=64): {tiles['total']['fraction']:.1%} ({ok}; "
            f"fwd {tiles['fwd']['fraction']:.1%}, bwd {tiles['bwd']['fraction']:.1%}; lowest: "
            + ", ".join(f"{k.strip('_')} {v['fraction']:.1%}" for k, v in worst) + ")"]


def targets(records: List[dict], tiles: Optional[dict] = None) -> List[str]:
    """The issue's static targets, checked on the records (forward/dq kernels of the families) and,
    when given, :func:`lsg_tiles`' useful-tile fraction."""
    ok = [r for r in records if "error" not in r and r["family"] != "reference" and r.get("block_m")
          and r.get("kept", True)]
    refs = [r for r in records if "error" not in r and r["family"] == "reference" and r["variant"] == "base"]
    spill = [r for r in ok if r.get("spill_bytes")]
    mu = [r for r in ok if r.get("masked_instr_per_tile") and r.get("unmasked_instr_per_tile")]
    mu_bad = [r for r in mu if r["masked_instr_per_tile"] > 1.3 * r["unmasked_instr_per_tile"]]
    # the yardstick reads no key mask and drops nothing: dropout / key-padding variants do more per tile
    extra = ("DROPOUT", "HAS_KMASK")
    fwd = [r for r in mu if r["kernel"].endswith("_fwd") and _same_config_ref(r, refs)
           and not any(f in r.get("flags", "").split(",") for f in extra)]
    fwd_bad = [r for r in fwd if r["unmasked_instr_per_tile"] > 1.1 * _same_config_ref(r, refs)]
    d128 = sorted({f"{r['kernel']} {r['config']}" for r in ok if r["head_dim"] == 128 and r.get("block_m") == 128
                   and r["mma"] == "wgmma" and not r.get("spill_bytes") and r["kernel"].endswith(("_fwd", "_dq"))})

    scanned = [r for r in records if "int_div_in_loops" in r and r["family"] != "reference" and r.get("kept", True)]
    div_bad = [r for r in scanned if r["int_div_in_loops"]]

    def names(rs):
        return ", ".join(sorted({f"{r['kernel']}{'' if r['variant'] == 'base' else ' (' + r['variant'] + ')'} "
                                 f"{r['config']} D={r['head_dim']}" for r in rs})[:12])
    per_family = []
    for fam in FAMILIES:
        prefix = {"sliding_window": "sw_", "segment": "seg_", "lsg": "lsg_"}[fam]
        rs = [r for r in ok if r["kernel"].startswith(prefix)]
        bad = [r for r in rs if r.get("spill_bytes")]
        per_family.append(f"  - {fam} kernels: {len(rs) - len(bad)} of {len(rs)}"
                          + (f" (spilling: {names(bad)})" if bad else ""))
    return [
        f"- 0 spill bytes: {len(ok) - len(spill)} of {len(ok)} variants; by the family that owns the kernel:",
        *per_family,
        f"- masked tile <= 1.3x unmasked: {len(mu) - len(mu_bad)} of {len(mu)}" + (
            f" (worst {max(r['masked_instr_per_tile'] / r['unmasked_instr_per_tile'] for r in mu):.2f})" if mu
            else ""),
        f"- forward unmasked tile <= 1.1x the reference row at the same tile/warps/D (variants without dropout "
        f"or a key mask, which the reference does not have): {len(fwd) - len(fwd_bad)} of "
        f"{len(fwd)}" + (f" (over: {names(fwd_bad)})" if fwd_bad else ""),
        f"- D=128 forward/dq on 128-row wgmma tiles without spills: {', '.join(d128) or 'none'}",
        (f"- no integer divide inside a loop: {len(scanned) - len(div_bad)} of {len(scanned)} variants"
         + (f" (divides in loops: {names(div_bad)})" if div_bad else "")) if scanned
        else "- no integer divide inside a loop: not scanned (records from before the PTX divide scan)",
        *_tiles_line(tiles),
    ]


def markdown(records: List[dict], meta: dict) -> str:
    ok = [r for r in records if "error" not in r]
    ref = [r for r in ok if r["family"] == "reference" and r["variant"] == "base"]
    yard = next((r for r in ref if r["config"].startswith("128x64/4w") and r["head_dim"] == 64), None)
    yard_u = yard.get("unmasked_instr_per_tile") if yard else None
    lines = [f"# Static sm_90 report ({meta['mode']})", "",
             f"Compiled for `GPUTarget('cuda', 90, 32)` without a GPU: triton {meta['triton']}, "
             f"ptxas `{meta['ptxas']}`, nvdisasm {'yes' if meta['nvdisasm'] else 'MISSING'}; "
             f"shape B={SHAPE['batch']}, H={SHAPE['heads']}, n={SHAPE['n']}, window {WINDOW}; "
             f"{len(ok)} variants compiled, {len(records) - len(ok)} errors, {meta['seconds']:.0f} s"
             + (f" (PARTIAL: {meta['done']} of {meta['jobs']} planned variants)" if meta["done"] < meta["jobs"] else "")
             + ".", "",
             "Columns: regs/thread; spill = ptxas spill stores + loads (bytes); smem = Triton's dynamic + static "
             "shared memory (bytes); warps/SM on an H100 (64K regs, 228 KB smem per SM) and what limits it; "
             "masked/unmasked = SASS instructions of one inner-loop iteration (one key/query tile) of the band "
             "walk (max of the two masked edges), counted per warp (compare equal warps); m/u = their ratio; "
             "u/ref = unmasked against the reference row's unmasked tile at the same tile, warps and D (the "
             f"yardstick 128x64/4w, D=64: {yard_u} here; Triton's tutorial measured 522).", ""]
    spilling = [r for r in ok if r.get("spill_bytes")]
    pruned = [r for r in ok if not r.get("kept", True)]
    lines += ["## Targets (issue 11)", "", "Over the variants today's pruners keep"
              + (f" ({len(pruned)} compiled variants are no longer kept and are left out here; they are "
                 f"marked `pruned` in the table)" if pruned else "") + ":", "",
              *targets(records, meta.get("lsg_tiles")), ""]
    lines += ["## Summary", "",
              f"- variants with spills: {len(spilling)} of {len(ok)}"
              + (": " + ", ".join(sorted({f"{r['kernel']} {r['config']} D={r['head_dim']} {r['dtype']} "
                                          f"({r['spill_bytes']} B)" for r in spilling})) if spilling else ""),
              ]
    mu = [(r["masked_instr_per_tile"] / r["unmasked_instr_per_tile"], r) for r in ok
          if r.get("masked_instr_per_tile") and r.get("unmasked_instr_per_tile") and r["family"] != "reference"]
    if mu:
        worst = max(mu, key=lambda x: x[0])
        lines.append(f"- masked/unmasked tile ratio: median {sorted(x[0] for x in mu)[len(mu) // 2]:.2f}, worst "
                     f"{worst[0]:.2f} ({worst[1]['kernel']} {worst[1]['config']} D={worst[1]['head_dim']})")
    d128 = [r for r in ok if r["head_dim"] == 128 and r.get("block_m") == 128 and r["mma"] == "wgmma"
            and not r.get("spill_bytes") and r["family"] != "reference"]
    lines.append(f"- D=128 variants with 128-row tiles on wgmma and no spills: "
                 f"{len(d128)} ({', '.join(sorted({r['kernel'] + ' ' + r['config'] for r in d128})) or 'none'})")
    errs = [r for r in records if "error" in r]
    if errs:
        lines.append(f"- errors: " + "; ".join(f"{r['family']}/{r['variant']} {r['kernel']} {r.get('config', '')}: "
                                              f"{r['error'][:120]}" for r in errs))
    lines += ["", "## Variants", "",
              "| family | variant | kernel | config | dtype | D | flags | regs | spill | smem | warps/SM (limit) "
              "| mma | loads | masked | unmasked | m/u | u/ref | loop mix (unmasked) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        um = next((lp for lp in r.get("loops", []) if lp.get("role") == "unmasked"), None)
        mix = " ".join(f"{k}{v}" for k, v in um["mix"].items()) if um else ""
        loads = " ".join(f"{k}:{v}" for k, v in r.get("loads", {}).items())
        lines.append(
            f"| {r['family']} | {r['variant']} | {r['kernel']} | {r['config']}"
            f"{' (pruned)' if not r.get('kept', True) else ''} | {r['dtype']} | {r['head_dim']} "
            f"| {r.get('flags', '')} | {r['regs']} | {r.get('spill_bytes')} | {r['smem_bytes']} "
            f"| {r.get('warps_per_sm')} ({r.get('occupancy_limit', '')}) | {r['mma']} | {loads} "
            f"| {r.get('masked_instr_per_tile', '')} | {r.get('unmasked_instr_per_tile', '')} "
            f"| {_ratio(r.get('masked_instr_per_tile'), r.get('unmasked_instr_per_tile'))} "
            f"| {_ratio(r.get('unmasked_instr_per_tile'), _same_config_ref(r, ref))} | {mix} |")
    for r in errs:
        lines.append(f"| {r['family']} | {r['variant']} | {r['kernel']} | {r.get('config', '')} | {r['dtype']} "
                     f"| {r['head_dim']} | ERROR: {r['error'][:150]} |||||||||||")
    return "\n".join(lines) + "\n"


def _joined(records: List[dict]) -> Dict[tuple, dict]:
    """Records by ``(family, variant, kernel, dtype, D, n)``: the ``n``-th launch of that kernel in that
    variant (a kernel may launch twice, e.g. ``sum_partial_rows``); the config is not in the key, so a
    change of the kept config shows as a change."""
    seen: Counter = Counter()
    out = {}
    for r in records:
        if "error" in r:
            continue
        k = (r["family"], r["variant"], r["kernel"], r["dtype"], r["head_dim"])
        out[k + (seen[k],)] = r
        seen[k] += 1
    return out


_COMPARED = ("config", "regs", "spill_bytes", "warps_per_sm", "mma", "masked_instr_per_tile",
             "unmasked_instr_per_tile")


def compare(before: List[dict], after: List[dict], title: str = "before -> after") -> str:
    """Markdown: the records of two reports of the same matrix joined on family/variant/kernel/dtype/D,
    the totals that issue 11 targets, and one row per record whose config, registers, spills, warps/SM,
    MMA kind or tile instruction counts changed."""
    b, a = _joined(before), _joined(after)
    both = [k for k in a if k in b]

    def count(recs, pred):
        return sum(1 for r in recs if pred(r))

    def over(r):
        m, u = r.get("masked_instr_per_tile"), r.get("unmasked_instr_per_tile")
        return bool(m and u and m > 1.3 * u)

    def spilled(recs):
        return sum(r.get("spill_bytes") or 0 for r in recs)

    def cell(x, y):
        return f"{x}" if x == y else f"{x} → {y}"
    rb, ra = [b[k] for k in both], [a[k] for k in both]
    occ_up = sum(1 for x, y in zip(rb, ra) if (y.get("warps_per_sm") or 0) > (x.get("warps_per_sm") or 0))
    occ_down = sum(1 for x, y in zip(rb, ra) if (y.get("warps_per_sm") or 0) < (x.get("warps_per_sm") or 0))
    changed = [k for k in both if any(b[k].get(f) != a[k].get(f) for f in _COMPARED)]
    lines = [f"# bench.sm90: {title}", "",
             f"{len(both)} records joined on family/variant/kernel/dtype/D ({len(b) - len(both)} only before, "
             f"{len(a) - len(both)} only after); {len(changed)} changed.", "",
             f"- spilling: {count(rb, lambda r: r.get('spill_bytes'))} → {count(ra, lambda r: r.get('spill_bytes'))}"
             f" records, {spilled(rb)} → {spilled(ra)} B",
             f"- masked tile > 1.3x its unmasked one: {count(rb, over)} → {count(ra, over)}",
             f"- warps/SM: higher in {occ_up}, lower in {occ_down}", "",
             "| family/variant | kernel | dtype | D | config | regs | spill B | warps/SM | mma | masked | unmasked "
             "| m/u |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in changed:
        x, y = b[k], a[k]
        cells = [cell(x.get(f), y.get(f)) for f in _COMPARED]
        mu = cell(_ratio(x.get("masked_instr_per_tile"), x.get("unmasked_instr_per_tile")) or "-",
                  _ratio(y.get("masked_instr_per_tile"), y.get("unmasked_instr_per_tile")) or "-")
        lines.append(f"| {k[0]}/{k[1]} | {k[2]} | {k[3]} | {k[4]} | " + " | ".join(cells) + f" | {mu} |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    ptxas = _tool("ptxas")
    version = ""
    if ptxas:
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return dict(triton=triton.__version__, torch=torch.__version__, ptxas=version, nvdisasm=_tool("nvdisasm") is not None,
                cuobjdump=_tool("cuobjdump") is not None, target=f"cuda:{TARGET_ARCH}", shape=SHAPE, window=WINDOW)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the headline configs only (default)")
    g.add_argument("--full", action="store_true", help="every kept config (bf16, D 64/128) and a config of every "
                   "dtype, head dim and flag variant (see matrix())")
    g.add_argument("--ci", action="store_true", help="three variants (the CI test's set)")
    g.add_argument("--variants", action="store_true", help="the first kept config of every kernel in every flag "
                   "variant, bf16 and fp16, at --head-dim (default 256)")
    p.add_argument("--family", default="sliding_window,segment,lsg")
    p.add_argument("--kernel", default=None, help="comma-separated kernel names to compile (e.g. lsg_fwd,lsg_bwd_dq; "
                   "default: all of the mode's)")
    p.add_argument("--head-dim", default=None, help="comma-separated head dims to compile (default: the mode's)")
    p.add_argument("--out", default=None, help="directory for sm90.json and sm90.md (default: print only)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--annotate", metavar="JSON", help="mark the records of a report by whether today's pruners "
                   "keep them, rewrite its JSON and markdown (no compiling)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="two sm90.json of the same matrix: "
                   "print (or with --out write compare.md) what changed between them (no compiling)")
    args = p.parse_args(argv)
    if args.compare:
        reports = []
        for path in args.compare:
            with open(path) as f:
                reports.append(json.load(f)["records"])
        md = compare(*reports, title=f"{args.compare[0]} → {args.compare[1]}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "compare.md"), "w") as f:
                f.write(md)
        else:
            print(md)
        return 0
    if args.annotate:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(args.annotate) as f:
            data = json.load(f)
        annotate_kept(data["records"])
        with open(args.annotate, "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.join(os.path.dirname(args.annotate), "sm90.md"), "w") as f:
            f.write(markdown(data["records"], data["meta"]))
        return 0
    if _tool("ptxas") is None:
        print("ptxas not found (triton/backends/nvidia/bin or PATH): cannot compile for sm_90", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mode = "full" if args.full else ("ci" if args.ci else ("variants" if args.variants else "quick"))
    families = [f for f in args.family.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            p.error(f"--family: unknown family {f!r}; allowed: {', '.join(FAMILIES)}")
    t0 = time.perf_counter()
    env = environment()
    if "lsg" in families:
        env["lsg_tiles"] = lsg_tiles()

    def write(records: List[dict], n_jobs: int) -> str:
        meta = dict(mode=mode, families=families, seconds=time.perf_counter() - t0, jobs=n_jobs,
                    done=len(records), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **env)
        md = markdown(records, meta)
        if args.out:  # rewritten after every variant: a run cut short keeps what it did
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "sm90.json"), "w") as f:
                json.dump(dict(meta=meta, records=records), f, indent=1)
            with open(os.path.join(args.out, "sm90.md"), "w") as f:
                f.write(md)
        return md

    kernels_only = [k for k in args.kernel.split(",") if k] if args.kernel else None
    try:
        dims = [int(x) for x in args.head_dim.split(",") if x] if args.head_dim else None
        if dims is None and mode == "variants":
            dims = [256]
    except ValueError:
        p.error(f"--head-dim: expected comma-separated integers, got {args.head_dim!r}")
    records = run(mode, families, log=lambda s: print(s, flush=True), reference=not args.no_reference,
                  on_record=write if args.out else None, kernels_only=kernels_only, dims=dims)
    md = write(records, len(records))
    if not args.out:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
