#!/usr/bin/env bash
# One-command set-up and run for lhattn, on a fresh machine or an existing one.
#
#   ./run.sh demo   [args]   # main job: patterns vs dense attention, checked against the oracle
#   ./run.sh test   [args]   # the test suite (what CI runs)
#   ./run.sh bench  [args]   # python -m bench [args]
#
# Creates/refreshes .venv (seeing the system's packages, so an installed torch -- e.g. a CUDA
# build -- is used, never replaced), installs only what is missing (torch==2.13.0 if no torch is
# importable), builds lhattn._C, then runs.  PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")"

job=${1:-}
case "$job" in demo|test|bench) shift ;; *) echo "usage: ./run.sh demo|test|bench [args...]" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

# torch first, on its own: never replace one that is already importable.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi

# Everything else, only if missing (module name = package spec). find_spec, not import: the
# lsg_converter package does not import on transformers 5 (the tests load its files one by one).
missing=()
for pair in triton:triton==3.9.0 numpy:numpy ninja:ninja pybind11:pybind11 pytest:pytest \
            transformers:transformers==5.23.0 lsg_converter:lsg-converter==0.1.9 \
            matplotlib:matplotlib tqdm:tqdm setuptools:setuptools; do
  mod=${pair%%:*}; spec=${pair#*:}
  "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null \
    || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[run.sh] installing: ${missing[*]}"
  pip_install "${missing[@]}"
fi

# Build lhattn._C against the torch above (ninja keeps rebuilds incremental).
echo "[run.sh] building lhattn._C"
MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
  > .venv/build.log 2>&1 || { cat .venv/build.log; exit 1; }

case "$job" in
  demo)  exec "$VPY" -m bench.demo "$@" ;;
  bench) exec "$VPY" -m bench "$@" ;;
  test)
    set +e
    "$VPY" -m pytest tests -q "$@"
    rc=$?
    if [ $rc -eq 5 ]; then echo "[run.sh] pytest collected no tests: failing" >&2; exit 1; fi
    exit $rc ;;
esac
