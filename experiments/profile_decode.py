"""GPU kernel timeline of the decode loop: NSA's default step and dense cuDNN, from jax.profiler.

    PYTHONPATH=$PWD python3 experiments/profile_decode.py --out $OUT     # H200, ~1 min

Runs :mod:`experiments.bench_decode`'s timed loop (one jitted ``fori_loop`` of ``--steps``
steps, one input set) once under ``jax.profiler.trace`` and reads the trace's GPU plane:
every kernel (and copy) with its start, duration and the gap after the one before it.
Prints the per-kernel medians and the time a step takes (see :func:`summary`), and writes
``decode_timeline.json``. The profiler adds a little time per launch; use it to see which
kernels and glue make a step, not as the benchmark. Off GPU there is no GPU plane and nothing is reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics

import jax
import jax.numpy as jnp

from experiments.bench_decode import DENSE_DIM, HEADS, KV_HEADS, looped, nsa_step, random_cache
from experiments.measure import gpu_events


def summary(events: list[dict]) -> dict:
    """``{name: [count, median us]}`` (largest total first) and the time a step takes: the median
    interval between successive starts of the kernel with the largest total, which runs once a step
    (the loop's first step also waits for its inputs, so the whole span would overstate it)."""
    if not events:
        return {"per_step_us": None, "kernels": {}}
    durations: dict[str, list[float]] = {}
    for event in events:
        durations.setdefault(event["name"], []).append(event["duration_us"])
    kernels = {name: [len(d), statistics.median(d)] for name, d in durations.items()}
    ordered = dict(sorted(kernels.items(), key=lambda kv: -kv[1][0] * kv[1][1]))
    starts = [event["start_us"] for event in events if event["name"] == next(iter(ordered))]
    intervals = [later - earlier for earlier, later in itertools.pairwise(starts)]
    return {"per_step_us": statistics.median(intervals) if intervals else None, "kernels": ordered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for decode_timeline.json")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 192], help="NSA Dk values (Dv = 128)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    key = jax.random.key(0)
    runs = {}
    q = jax.random.normal(key, (args.batch, 1, HEADS, DENSE_DIM), jnp.bfloat16)
    shape = (args.batch, args.length, KV_HEADS, DENSE_DIM)
    k, v = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) for i in (1, 2))
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    dense = lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, implementation=implementation),)
    fn, _ = looped(dense, 1, args.steps)
    runs[f"dense_{implementation}"] = gpu_events(fn, (q, ((k, v),)))
    del k, v
    for dk in args.dims:
        cache = random_cache(jax.random.fold_in(key, dk), batch=args.batch, length=args.length, dk=dk, dv=128)
        q = jax.random.normal(jax.random.fold_in(key, 7), (args.batch, HEADS, dk), jnp.bfloat16)
        fn, _ = looped(nsa_step("new"), 1, args.steps)
        runs[f"nsa_dk{dk}"] = gpu_events(fn, (q, ((cache,),)))
        del cache
    report = {"batch": args.batch, "length": args.length, "steps": args.steps, "runs": {}}
    for name, events in runs.items():
        report["runs"][name] = {**summary(events), "events": events}
        result = report["runs"][name]
        per_step = result["per_step_us"]
        print(f"{name}: {'no GPU events' if per_step is None else f'{per_step:.1f} us a step'}")
        for kernel, (count, median) in result["kernels"].items():
            print(f"  {count:4d} x {median:8.2f} us  {kernel[:100]}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_timeline.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
