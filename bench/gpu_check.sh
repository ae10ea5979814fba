#!/usr/bin/env bash
# Build, test and benchmark lhattn on a CUDA machine that has torch + triton installed and no network.
#
#   bash bench/gpu_check.sh OUTDIR [PART]
#
# PART (default all):
#   tests                  build the extension, run the whole test suite natively on the GPU
#   bench                  build, run the issue-7 GPU sweep (python -m bench --preset gpu-issue7) under a time budget
#   bench-sliding_window   the same, one pattern only (also bench-lsg, bench-segment): more of that pattern fits
#   demo                   build, run python -m bench.demo
#   encoder                build, run python -m bench.encoder_layer (issue 6: TransformerEncoderLayer, stock vs lhattn)
#   hf                     build, run python -m bench.hf_models (issue 12: HF models, lhattn vs sdpa vs eager; hf.log +
#                          hf_models.json/.md)
#   context-parallel       build, torchrun -m bench.context_parallel over every visible GPU (NCCL; issue 13) into
#                          cp.log -- weak scaling needs >= 2 GPUs, one GPU only gives the 1-rank baseline
#   all                    build, tests, bench (needs more than one 9-minute device call: prefer the parts)
#   quick                  the issue-11 GPU proof in one call (<= 8 minutes from a bare machine, build
#                          included): build; GPU-native correctness of every family against the oracle
#                          (fwd+bwd; fp16, bf16, fp32; globals, padding, GQA, dropout), fp64 gradcheck,
#                          opcheck of the CUDA ops (pytest subset, QUICK_TESTS_K); then the headline
#                          ratios (python -m bench.headline). The autotuners try only the first
#                          LHATTN_AUTOTUNE_CONFIGS (default 1 here) of their kept configs.
#                          Files: env.txt build.log tests.log headline.log headline.json summary.md
#
# Everything lands flat in OUTDIR, at most 8 files:
#   env.txt  build.log  tests.log  bench.log  bench.json  bench.md  bench_time.png  bench_memory.png
# (demo writes demo.log, encoder writes encoder.log + encoder_layer.json/.md and, with dropout 0.1,
# encoder_dropout.log + dropout/encoder_layer.json/.md, instead of the bench files).
#
# Time: every part stops itself before DEADLINE_S seconds (default 510) after the script started, so one
# part fits a 9-minute call: the build takes what it takes, pytest gets the rest (minus 15 s), and the sweep
# stops starting new cases BENCH_RESERVE_S (default 90) before the deadline, is killed 20 s before it, and
# its markdown and PNGs are regenerated from the JSON (rewritten after every case) either way.
#
# quick's time plan (DEADLINE_S defaults to 470 for it): the build takes what it takes (at most until
# QUICK_BUILD_END_S=180), the tests run until QUICK_TESTS_END_S (default 290), the headline ratios get
# the rest minus 15 s (each stage is killed at its limit and says so in its log; bench.headline stops
# starting cases at its own limit and rewrites summary.md and headline.json after every case, so a kill in
# the middle of one keeps the others).
#
# Environment: PYTHON (default python3), DEADLINE_S, BENCH_RESERVE_S, PYTEST_ARGS (default "-x -q -rs"),
# QUICK_TESTS_K, QUICK_TESTS_END_S, QUICK_TESTS_WORKERS (default 8, when pytest-xdist is importable),
# BENCH_ARGS (extra arguments for python -m bench), MAX_JOBS (default 16), SKIP_BUILD=1 (extension already built).

set -uo pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [tests|bench|bench-PATTERN|demo|all]}
PART=${2:-all}
PY=${PYTHON:-python3}
if [[ "$PART" == quick ]]; then DEADLINE_S=${DEADLINE_S:-470}; else DEADLINE_S=${DEADLINE_S:-510}; fi
BENCH_RESERVE_S=${BENCH_RESERVE_S:-90}
START=$(date +%s)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the real GPU, not the interpreter

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

encoder() {
  local t=$(( $(left) - 10 ))
  say "encoder layer (time limit ${t}s)"
  timeout "$t" "$PY" -m bench.encoder_layer --device cuda --out "$OUT" > "$OUT/encoder.log" 2>&1
  say "encoder rc=$?"
  # training as torch configures it by default (dropout 0.1 on attention weights and residuals)
  t=$(( $(left) - 10 ))
  if [ "$t" -gt 60 ]; then
    say "encoder layer, dropout 0.1 (time limit ${t}s)"
    timeout "$t" "$PY" -m bench.encoder_layer --device cuda --n 4096,16384 --dropout 0.1 --out "$OUT/dropout" \
      > "$OUT/encoder_dropout.log" 2>&1
    say "encoder dropout rc=$?"
  fi
}

hf() {
  local t=$(( $(left) - 10 ))
  say "hf models (time limit ${t}s)"
  timeout "$t" "$PY" -m bench.hf_models --device cuda --out "$OUT" > "$OUT/hf.log" 2>&1
  say "hf rc=$?"
}

env_report() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    nvcc --version 2>&1 | tail -n 2
    "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
for mod in ("triton", "transformers", "numpy", "matplotlib", "tqdm", "pytest"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:
        print(mod, "MISSING", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
else:
    print("NO CUDA DEVICE VISIBLE TO TORCH")
EOF
  } > "$OUT/env.txt"
}

build() {
  if [[ "${SKIP_BUILD:-0}" == 1 ]]; then say "build skipped (SKIP_BUILD=1)"; echo "skipped (SKIP_BUILD=1)" > "$OUT/build.log"; return; fi
  say "build (python setup.py build_ext --inplace)"
  local t=$(( $(left) - 60 ))
  (( t < 60 )) && t=60
  {
    echo "$ MAX_JOBS=${MAX_JOBS:-16} python setup.py build_ext --inplace"
    MAX_JOBS=${MAX_JOBS:-16} timeout "$t" "$PY" setup.py build_ext --inplace
    rc=$?
    if (( rc != 0 )); then
      echo "build_ext failed (rc=$rc); trying: pip install --no-build-isolation --no-deps -e ."
      MAX_JOBS=${MAX_JOBS:-16} timeout "$(( $(left) - 60 ))" "$PY" -m pip install --no-build-isolation --no-deps -e .
    fi
    echo "--- import check"
    "$PY" - <<'EOF'
import torch, lhattn
print("lhattn", lhattn.__version__, "from", lhattn.__file__)
from kernels._launch import TRITON_VERSION, _TUNED_FOR_3_9
print("triton", TRITON_VERSION, "-> tuning calibrated for", "triton >= 3.9" if _TUNED_FOR_3_9 else
      "triton < 3.9 (measured on 3.6, bench/results/sm90-static-20261203/triton36)")
try:
    import lhattn._ops  # loads lhattn._C, registers torch.ops.lhattn.*
    x = torch.randn(1, 1, 4, 8, device="cuda")
    idx = torch.tensor([[[0, 2]]], device="cuda")
    print("torch.ops.lhattn.gather_rows on CUDA:", tuple(torch.ops.lhattn.gather_rows(x, idx).shape))
except Exception as exc:
    print("lhattn._C / CUDA op check FAILED:", type(exc).__name__, exc)
q = torch.randn(1, 2, 64, 32, device="cuda")
print("triton_unavailable_reason(SlidingWindow):", lhattn.triton_unavailable_reason(q, lhattn.SlidingWindow(8)))
print("triton_unavailable_reason(Segments):", lhattn.triton_unavailable_reason(q, lhattn.Segments(16)))
print("triton_unavailable_reason(LSG):", lhattn.triton_unavailable_reason(q, lhattn.LSG(block_size=16)))
EOF
  } > "$OUT/build.log" 2>&1
  say "build done: $(tail -n 4 "$OUT/build.log" | tr '\n' ' ')"
}

tests() {
  local t=$(( $(left) - 15 ))
  say "tests: python -m pytest tests ${PYTEST_ARGS:--x -q -rs} (time limit ${t}s)"
  (( t < 30 )) && { echo "no time left for the tests" > "$OUT/tests.log"; return; }
  # shellcheck disable=SC2086
  timeout "$t" "$PY" -m pytest tests ${PYTEST_ARGS:--x -q -rs} --durations=15 -p no:cacheprovider \
    > "$OUT/tests.log" 2>&1
  local rc=$?
  (( rc == 124 )) && echo "gpu_check: pytest killed after ${t}s (time limit)" >> "$OUT/tests.log"
  say "tests rc=$rc: $(tail -n 1 "$OUT/tests.log")"
}

bench() {
  local pattern=${1:-all}
  local budget=$(( $(left) - BENCH_RESERVE_S ))
  local hard=$(( $(left) - 20 ))
  say "bench: pattern=$pattern budget=${budget}s (killed after ${hard}s)"
  if (( budget < 30 )); then echo "no time left for the benchmarks" >> "$OUT/bench.log"; return; fi
  # shellcheck disable=SC2086
  timeout "$hard" "$PY" -m bench --preset gpu-issue7 --pattern "$pattern" --budget-s "$budget" --out "$OUT" \
    ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1
  local rc=$?
  (( rc == 124 )) && echo "gpu_check: bench killed at the ${hard}s limit; report regenerated from the JSON" \
    >> "$OUT/bench.log"
  if [[ -f "$OUT/bench.json" ]]; then
    timeout 60 "$PY" -m bench.report "$OUT/bench.json" >> "$OUT/bench.log" 2>&1
  fi
  rm -f "$OUT"/*.tmp
  say "bench rc=$rc"
}

quick_tests() {
  local t=$(( ${QUICK_TESTS_END_S:-290} - ($(date +%s) - START) ))
  local k=${QUICK_TESTS_K:-"oracle_fp32 or oracle_half or oracle_other or gradcheck or opcheck or dropout or gqa or padding or global"}
  # The selection launches about 560 distinct kernel specialisations (counted on CPU under the interpreter,
  # 2026-12-03), each a compile on the GPU: 0.44 s on average with Triton 3.6 here (bench.sm90), about 4 min
  # in one process. pytest-xdist (in the GPU machine's image) spreads them over QUICK_TESTS_WORKERS processes.
  local par=()
  if "$PY" -c "import xdist" 2>/dev/null; then par=(-n "${QUICK_TESTS_WORKERS:-8}"); fi
  say "quick tests (-k '$k', ${par[*]:-one process}, time limit ${t}s, LHATTN_AUTOTUNE_CONFIGS=$LHATTN_AUTOTUNE_CONFIGS)"
  (( t < 30 )) && { echo "no time left for the tests" > "$OUT/tests.log"; return; }
  timeout "$t" "$PY" -m pytest tests/test_triton_sliding_window.py tests/test_triton_segment.py \
    tests/test_triton_lsg.py tests/test_triton_dropout.py tests/test_triton_lsg_dropout.py tests/test_ops.py \
    tests/test_lsg_ops.py -q -rs -p no:cacheprovider --durations=10 ${par[@]+"${par[@]}"} -k "$k" > "$OUT/tests.log" 2>&1
  local rc=$?
  (( rc == 124 )) && echo "gpu_check: pytest killed after ${t}s (time limit)" >> "$OUT/tests.log"
  say "quick tests rc=$rc: $(tail -n 1 "$OUT/tests.log")"
}

headline() {
  local t=$(( $(left) - 15 ))
  say "headline ratios (time limit ${t}s)"
  (( t < 30 )) && { echo "no time left for the headline ratios" > "$OUT/headline.log"; return; }
  timeout "$t" "$PY" -m bench.headline --out "$OUT" --time-limit-s $(( t - 60 )) > "$OUT/headline.log" 2>&1
  local rc=$?
  (( rc == 124 )) && echo "gpu_check: headline killed after ${t}s (time limit)" >> "$OUT/headline.log"
  say "headline rc=$rc"
}

quick() {
  export LHATTN_AUTOTUNE_CONFIGS=${LHATTN_AUTOTUNE_CONFIGS:-1}
  local saved=$DEADLINE_S
  DEADLINE_S=${QUICK_BUILD_END_S:-180}; build; DEADLINE_S=$saved
  quick_tests
  headline
}

demo() {
  local t=$(( $(left) - 10 ))
  say "demo (time limit ${t}s)"
  timeout "$t" "$PY" -m bench.demo > "$OUT/demo.log" 2>&1
  say "demo rc=$?"
}

context_parallel() {
  local t=$(( $(left) - 10 ))
  local ngpu
  ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  say "context-parallel on ${ngpu} GPU(s) (time limit ${t}s)"
  (( ngpu < 2 )) && echo "only ${ngpu} GPU visible: no multi-rank NCCL run possible, 1-rank baseline only" > "$OUT/cp.log"
  timeout "$t" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$(( ngpu > 0 ? ngpu : 1 ))" \
    -m bench.context_parallel --per-rank 65536 --reps 5 >> "$OUT/cp.log" 2>&1
  say "context-parallel rc=$?"
}

env_report
case "$PART" in
  tests) build; tests ;;
  bench) build; bench all ;;
  bench-sliding_window|bench-lsg|bench-segment) build; bench "${PART#bench-}" ;;
  demo) build; demo ;;
  encoder) build; encoder ;;
  hf) build; hf ;;
  context-parallel) build; context_parallel ;;
  all) build; tests; bench all ;;
  quick) quick ;;
  *) echo "unknown part '$PART' (tests | bench | bench-sliding_window | bench-lsg | bench-segment | demo | encoder | hf | context-parallel | quick | all)"; exit 2 ;;
esac
say "done; files in $OUT:"
ls -la "$OUT"
# the last lines of each log, for the caller's output tail
for f in build.log tests.log bench.log demo.log cp.log hf.log headline.log; do
  [[ -f "$OUT/$f" ]] && { echo "=== $f (tail)"; tail -n 25 "$OUT/$f"; }
done
[[ -f "$OUT/bench.md" ]] && { echo "=== bench.md (head)"; head -n 60 "$OUT/bench.md"; }
[[ -f "$OUT/summary.md" ]] && { echo "=== summary.md"; cat "$OUT/summary.md"; }
exit 0
