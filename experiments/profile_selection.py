"""GPU kernel timeline of one selected-attention forward+backward, from jax.profiler.

    PYTHONPATH=$PWD python3 experiments/profile_selection.py --out $OUT     # H200, ~30 s

Runs :mod:`experiments.bench_selection`'s op (``nsa_jax.selected_attention``, the GPU defaults
of ``tuning_for``) forward and backward, jitted, once under ``jax.profiler.trace`` on
``bench_selection``'s random causal blocks (B=1, HQ=64, H=4, n=16 blocks of 64), and lists
every kernel and copy of at least ``--min-us`` with the gap before it, then the span, the sum
of all kernels (ours, cuDNN's, XLA's), and the gaps of over 5 us (host-driven work shows
there: session 11 found the inverse map's binary search running as a while loop, 23
iterations with ~10 us gaps each).
Writes ``selection_timeline.json`` with every event. The profiler adds a little time per
launch: use it to see which kernels and gaps make the time, not as the benchmark. Off GPU
there is no GPU plane and nothing is reported.
"""

from __future__ import annotations

import argparse
import pathlib

import jax

from experiments.bench_selection import make_inputs, ours
from experiments.measure import gpu_events, report_timeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for selection_timeline.json")
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--dk", type=int, default=128, help="Dk (Dv = 128)")
    parser.add_argument("--first-block", action="store_true", help="block 0 in every selection")
    parser.add_argument("--min-us", type=float, default=20.0, help="list kernels at least this long")
    args = parser.parse_args()
    if args.length < 1 or args.min_us < 0:
        parser.error("--length must be positive and --min-us non-negative")
    q, k, v, ct, indices = make_inputs(args.length, 64, 4, args.dk, 128, seed=1, first_block=args.first_block)
    op = ours()
    step = jax.jit(lambda q, k, v, ct, i: jax.vjp(lambda q, k, v: op(q, k, v, i), q, k, v)[1](ct))
    events = gpu_events(step, (q, k, v, ct, indices))
    settings = {name: value for name, value in vars(args).items() if name != "out"}
    report_timeline(events, args.min_us, args.out, "selection_timeline.json", settings)


if __name__ == "__main__":
    main()
