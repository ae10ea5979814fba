"""lhattn microbenchmarks: O(n·w) attention patterns against their O(n²) and same-pattern peers.

Entry points (run from the repository root):

* ``python -m bench ...``        -- the sweep (:mod:`bench.run`); ``--help`` lists the options
* ``python -m bench.demo``       -- a 2-3 minute demo table on whatever device is there
* ``python -m bench.report JSON`` / ``python -m bench.plot JSON`` -- regenerate markdown / PNGs
* ``bash bench/gpu_check.sh OUTDIR [tests|bench|all]`` -- build, test and benchmark on a CUDA machine

Modules: ``providers`` (one function per implementation), ``case`` (timing and memory of one
case), ``flops`` (useful work counted from the pattern), ``run`` (sweeps, presets, JSON),
``report`` (markdown, ratios, slopes), ``plot`` (PNGs). Results go to ``bench/results/``.
"""
