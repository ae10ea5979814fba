#!/usr/bin/env bash
# One-command set-up and run for lhattn, on a fresh machine or an existing one.
# `./run.sh --help` lists the commands, their options and the environment variables.
#
# Set-up (every command, each step announced with its duration): create .venv (seeing the
# system's packages, so an installed torch -- e.g. a CUDA build -- is used, never replaced);
# install torch==2.13.0 only if no torch is importable; install whatever else is missing; build
# lhattn._C -- skipped when the build stamp (.venv/lhattn-build.stamp: hash of csrc/, setup.py,
# pyproject.toml + torch version + python version + LHATTN_FORCE_CPU) matches and the built
# extension is still there.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'EOF'
usage: ./run.sh COMMAND [ARGS...]

Commands (each first does the set-up below, which is a no-op when nothing changed):
  demo  [ARGS]   each pattern vs dense SDPA, checked against the oracle: python -m bench.demo
                   --device auto|cpu|cuda   --n 4k,16k,...   --budget-s SECONDS   --repeats R
                   (./run.sh demo --help for all)
  test  [ARGS]   the test suite, what CI runs (.ci/run): python -m pytest tests -q [ARGS]
                   e.g. ./run.sh test tests/test_reference.py -x
  bench [ARGS]   benchmarks: python -m bench
                   --quick                  every provider and pattern at tiny n (a smoke run)
                   --preset NAME            a committed sweep (e.g. cpu-issue7)
                   --out DIR                where results go (default: bench/out/, git-ignored)
                   (./run.sh bench --help for all)
  setup          only the set-up, then exit
  help, -h, --help   this text (no set-up)

Environment:
  PYTHON=python3          interpreter that creates .venv (only when .venv does not exist yet)
  MAX_JOBS=2              parallel compile jobs when lhattn._C is built
  LHATTN_REBUILD=1        build lhattn._C even when the build stamp matches
  LHATTN_FORCE_CPU=1      build lhattn._C without its CUDA sources (part of the stamp)
  TRITON_INTERPRET=1      run the Triton kernels in Triton's interpreter on CPU tensors
                          (the tests set it themselves when there is no GPU)
  PIP_INDEX_URL etc.      read by pip as usual

Expected durations on 2 CPU cores: see README.md ("Set-up and expected durations").
EOF
}

job=${1:-}
case "$job" in
  help|-h|--help) usage; exit 0 ;;
  demo|test|bench|setup) shift ;;
  *) echo "run.sh: unknown command ${job:-(none)}" >&2; usage >&2; exit 2 ;;
esac

t_setup=$SECONDS
step() { echo "[run.sh] $*"; }
took() { echo "[run.sh]   ... done in $(( SECONDS - $1 )) s"; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  t=$SECONDS; step "creating .venv with $PY (sees the system's packages)"
  "$PY" -m venv --system-site-packages .venv
  took $t
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check --progress-bar on "$@"; }

# torch first, on its own: never replace one that is already importable.
if ! "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
  t=$SECONDS; step "installing torch==2.13.0 (no torch found; a download of several hundred MB)"
  pip_install "torch==2.13.0"
  took $t
fi

# Everything else, only if missing (module name = package spec). find_spec, not import: the
# lsg_converter package does not import on transformers 5 (the tests load its files one by one).
# (an array from word splitting, not mapfile: macOS still ships bash 3.2)
# shellcheck disable=SC2207
missing=($("$VPY" - <<'EOF'
import importlib.util
for pair in ("triton:triton==3.9.0 numpy:numpy ninja:ninja pybind11:pybind11 pytest:pytest "
             "transformers:transformers==5.23.0 lsg_converter:lsg-converter==0.1.9 "
             "matplotlib:matplotlib tqdm:tqdm setuptools:setuptools").split():
    mod, spec = pair.split(":", 1)
    if importlib.util.find_spec(mod) is None:
        print(spec)
EOF
))
if [ ${#missing[@]} -gt 0 ]; then
  t=$SECONDS; step "installing what is missing: ${missing[*]}"
  pip_install "${missing[@]}"
  took $t
fi

# Build lhattn._C against the torch above, unless the stamp says nothing it depends on changed.
stamp_file=.venv/lhattn-build.stamp
stamp=$( { find csrc -type f | LC_ALL=C sort | xargs sha256sum; sha256sum setup.py pyproject.toml;
           "$VPY" -c "import importlib.metadata as m, sys; print('torch', m.version('torch'), sys.version)";
           echo "LHATTN_FORCE_CPU=${LHATTN_FORCE_CPU:-0}"; } | sha256sum | cut -d' ' -f1 )
built() {  # the extension built by the last successful build is still there
  compgen -G "lhattn/_C*.so" > /dev/null || compgen -G "lhattn/_C*.pyd" > /dev/null
}
if [ "${LHATTN_REBUILD:-0}" != 1 ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && built; then
  step "lhattn._C is up to date (csrc/, setup.py and torch unchanged; LHATTN_REBUILD=1 forces a build)"
else
  t=$SECONDS; step "building lhattn._C with MAX_JOBS=${MAX_JOBS:-2} (pip install -e .; log: .venv/build.log)"
  rm -f "$stamp_file"
  MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
    > .venv/build.log 2>&1 || { cat .venv/build.log; exit 1; }
  echo "$stamp" > "$stamp_file"
  took $t
fi
[ $(( SECONDS - t_setup )) -gt 1 ] && step "set-up took $(( SECONDS - t_setup )) s"

case "$job" in
  setup) exit 0 ;;
  demo)  exec "$VPY" -m bench.demo "$@" ;;
  bench) exec "$VPY" -m bench "$@" ;;
  test)
    set +e
    "$VPY" -m pytest tests -q "$@"
    rc=$?
    if [ $rc -eq 5 ]; then echo "[run.sh] pytest collected no tests: failing" >&2; exit 1; fi
    exit $rc ;;
esac
