"""GPU kernel timeline of one NSA attention op (``nsa_jax.nsa_attention``), from jax.profiler.

    PYTHONPATH=$PWD python3 experiments/profile_layer.py --out $OUT               # H200, ~40 s
    PYTHONPATH=$PWD python3 experiments/profile_layer.py --dk 192 --forward-only

Runs the op of :mod:`experiments.bench_layer` (paper configuration, B=1, HQ=64, H=4, the GPU
defaults of every branch) forward and backward (or forward only), jitted, once under
``jax.profiler.trace`` on ``bench_layer.op_inputs``, and lists every kernel and copy of at least
``--min-us`` with the gap before it, then the span and the kernels' time split into this
project's Pallas kernels, cuDNN's and XLA's (the layout changes, cotangent fusions and sums
between the branches: the glue an end-to-end speed-up must also cut), and the gaps of over
5 us. Writes ``layer_timeline.json`` with every event. The profiler adds a little time per
launch: use it to see which kernels and gaps make the time, not as the benchmark
(``bench_layer.py --parts time`` is). Off GPU there is no GPU plane and nothing is reported.
"""

from __future__ import annotations

import argparse
import pathlib

import jax

import nsa_jax
from experiments.bench_layer import NSA_INPUTS, PAPER, op_inputs, with_vjp
from experiments.measure import gpu_events, report_timeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for layer_timeline.json")
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--forward-only", action="store_true", help="time the forward alone")
    parser.add_argument("--min-us", type=float, default=100.0, help="list kernels at least this long")
    args = parser.parse_args()
    if min(args.length, args.dk, args.dv) < 1 or args.min_us < 0:
        parser.error("--length, --dk and --dv must be positive and --min-us non-negative")
    x = op_inputs(args.length, args.dk, args.dv, PAPER)

    def op(*arrays):
        return nsa_jax.nsa_attention(*arrays, **PAPER)

    inputs = tuple(x[name] for name in NSA_INPUTS)
    if args.forward_only:
        events = gpu_events(jax.jit(op), inputs)
    else:
        events = gpu_events(jax.jit(with_vjp(op, len(NSA_INPUTS))), (*inputs, x["cotangent"]))
    settings = {name: value for name, value in vars(args).items() if name != "out"}
    report_timeline(events, args.min_us, args.out, "layer_timeline.json", settings)


if __name__ == "__main__":
    main()
