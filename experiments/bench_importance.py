"""GPU check and timing of select_blocks' Mosaic scores and top-n kernel against its Triton kernel.

Run on the H200 from the repo root (about 1-2 minutes)::

    PYTHONPATH=$PWD python3 experiments/bench_importance.py --out $OUT [--skip-checks]
        [--rounds 3] [--iters 5] [--dks 128 192] [--top-n l4w4 l1w1 ...]
        [--budgets 268435456 67108864] [--budgets-only] [--memory-lengths 131072 262144]

1. Checks (unless ``--skip-checks``): the default ``select_blocks`` (the Mosaic scores of
   :mod:`pallas_kernels.gpu.block_importance_mosaic` and :mod:`pallas_kernels.gpu.top_n`) against
   the ``xla`` reference on the same inputs and lse (bf16, B=1, HQ=64, H=4, lse from our compressed
   forward) at T = 5000 (Dk = 128 and 192) and T = 64K (Dk = 192): picks equal except near ties
   (:func:`experiments.bench_select_blocks.near_tie_rows`).
2. Timing at T = 64K, paper geometry, bf16, interleaved rounds
   (:func:`experiments.measure.alternating_rounds`): the Triton kernel (``triton``, its default
   tuning), the default pipeline (``default``), the scores alone for both ``positions`` tunings
   (``importance_P16``, ``importance_P8``, and each with ``overlap``), and the top-n kernel alone
   on the default scores for each ``--top-n`` launch in :data:`TOP_N`; the picks of ``default``
   are compared with ``triton``'s. Each ``--budgets`` value adds the default pipeline holding at
   most that many float32 importances at once (``budget_N``,
   ``ImportanceTuning.max_importances``), and ``one_launch`` (every position's importances, then
   the top-n: session 28's default), with their compiled temporary memory (``temp_mib``); their
   picks must be equal. ``--budgets-only`` times only those and ``triton``.
3. ``--memory-lengths``: at each T (Dk = 128), the compiled temporary memory of the default
   pipeline and of ``one_launch``, their times (interleaved rounds), and whether their picks are equal
   (``memory``).

Writes ``bench_importance.json`` (and ``.md``) into ``--out``. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import numpy as np

import nsa_jax
from experiments import bench_select_blocks as bsb
from experiments.measure import alternating_rounds, write_report
from pallas_kernels.gpu import block_importance_mosaic, select_blocks, top_n

GEOMETRY = dict(block_length=bsb.L, block_stride=bsb.D, selection_block_size=bsb.L_SEL)
PICKS = dict(num_selected=bsb.N, num_initial_blocks=1, num_local_blocks=2)
TOP_N = {
    "l4w4": top_n.TopNTuning(4, 4, "lanes"),
    "l1w1": top_n.TopNTuning(1, 1, "lanes"),
    "l2w1": top_n.TopNTuning(2, 1, "lanes"),
    "f2w1": top_n.TopNTuning(2, 1, "flat"),
    "l1w4": top_n.TopNTuning(1, 4, "lanes"),
    "f1w2": top_n.TopNTuning(1, 2, "flat"),
    "l4w4_whole": top_n.TopNTuning(4, 4, "lanes", narrowest=1024),
}


def default_select(q, k, lse):
    return select_blocks.select_blocks(q, k, lse, **GEOMETRY, **PICKS, scale=q.shape[-1] ** -0.5)


def triton_select(q, k, lse):
    tuning = select_blocks.default_tuning(q.dtype, q.shape[-1], q.shape[1])
    return select_blocks.select_blocks(
        q, k, lse, **GEOMETRY, **PICKS, scale=q.shape[-1] ** -0.5, tuning=tuning
    )


def budget_select(budget: int):
    def fn(q, k, lse):
        tuning = dataclasses.replace(
            block_importance_mosaic.default_tuning(q.shape[-1]), max_importances=budget
        )
        return block_importance_mosaic.select_blocks(
            q, k, lse, **GEOMETRY, **PICKS, scale=q.shape[-1] ** -0.5, tuning=tuning
        )

    return fn


def one_launch_select(q, k, lse):
    scores = block_importance_mosaic.block_importance(q, k, lse, **GEOMETRY, scale=q.shape[-1] ** -0.5)
    return top_n.top_blocks(scores, selection_block_size=bsb.L_SEL, **PICKS)


def importance(positions: int, overlap: bool = False):
    tuning = block_importance_mosaic.ImportanceTuning(positions=positions, overlap=overlap)

    def fn(q, k, lse):
        return block_importance_mosaic.block_importance(
            q, k, lse, **GEOMETRY, scale=q.shape[-1] ** -0.5, tuning=tuning
        )

    return fn


def picks_of(tuning: top_n.TopNTuning):
    def fn(scores):
        return top_n.top_blocks(scores, selection_block_size=bsb.L_SEL, tuning=tuning, **PICKS)

    return fn


def check(length: int, dk: int) -> dict:
    start = time.perf_counter()
    q, k, lse = bsb.inputs(length, dk)
    ours = np.asarray(jax.jit(default_select)(q, k, lse))
    ref = jax.jit(
        lambda q, k, lse: nsa_jax.select_blocks(q, k, lse, **GEOMETRY, **PICKS, implementation="xla")
    )
    expected = np.asarray(ref(q, k, lse))
    mismatched, judged, near = bsb.near_tie_rows(q, k, lse, ours, expected)
    result = dict(
        T=length,
        dk=dk,
        rows=int(np.prod(expected.shape[:3])),
        mismatched_rows=mismatched,
        judged_rows=judged,
        near_tie_rows=near,
        ok=bool(mismatched == judged == near),
        seconds=time.perf_counter() - start,
    )
    print(result, flush=True)
    return result


def compiled_with_memory(select, q, k, lse):
    """``(compiled select, its temporary memory in MiB)``."""
    compiled = jax.jit(select).lower(q, k, lse).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes / 2**20


def memory_at(length: int, rounds: int, iters: int, dk: int = 128) -> dict:
    """Temporary memory (MiB), ms (medians of interleaved rounds) and equal picks: the default and
    ``one_launch`` at T."""
    q, k, lse = bsb.inputs(length, dk)
    result = dict(T=length, dk=dk)
    calls = {}
    for name, select in (("default", default_select), ("one_launch", one_launch_select)):
        compiled, result[f"{name}_temp_mib"] = compiled_with_memory(select, q, k, lse)
        calls[name] = (compiled, (q, k, lse))
    for name, ms in alternating_rounds(calls, rounds=rounds, iters=iters).items():
        result[f"{name}_ms"] = float(np.median(ms))
    picks = [np.asarray(fn(*args)) for fn, args in calls.values()]
    result["picks_equal"] = bool(np.array_equal(*picks))
    print(result, flush=True)
    return result


def markdown(report: dict) -> str:
    lines = [
        "# select_blocks: Mosaic scores + top-n kernel against the Triton kernel",
        "",
        f"Device: {report['device']}; jax {report['jax']}; command: `{report['command']}`.",
        f"Paper geometry, HQ=64, H=4, bf16; ms, medians of {report['rounds']} interleaved rounds.",
    ]
    if report["timing"]:
        lines += [
            "",
            "T = 64K:",
            "",
            "| Dk | " + " | ".join(report["names"]) + " | rows unlike triton's |",
            "|---|" + "---|" * (len(report["names"]) + 1),
        ]
    for dk, timing in report["timing"].items():
        cells = [f"{np.median(timing['ms'][name]):.3f}" for name in report["names"]]
        lines.append(f"| {dk} | " + " | ".join(cells) + f" | {timing['rows_unlike_triton']} |")
    for dk, timing in report["timing"].items():
        if timing.get("temp_mib"):
            memory = ", ".join(f"{name} {mib:.0f}" for name, mib in timing["temp_mib"].items())
            lines.append(f"\nDk={dk}, compiled temporary memory (MiB): {memory}.")
    for m in report["memory"]:
        lines.append(
            f"\nT={m['T']}, Dk={m['dk']}: temporary memory {m['default_temp_mib']:.0f} MiB (default) against "
            f"{m['one_launch_temp_mib']:.0f} (one_launch); {m['default_ms']:.2f} / "
            f"{m['one_launch_ms']:.2f} ms; picks equal: {m['picks_equal']}."
        )
    checks = ", ".join(f"T={c['T']} Dk={c['dk']} {'PASS' if c['ok'] else 'FAIL'}" for c in report["checks"])
    lines += ["", "Checks: " + (checks or "skipped (--skip-checks).")]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dks", type=int, nargs="*", default=[128, 192])
    parser.add_argument("--top-n", nargs="+", default=list(TOP_N), choices=list(TOP_N))
    parser.add_argument("--budgets", type=int, nargs="*", default=[])
    parser.add_argument("--budgets-only", action="store_true")
    parser.add_argument("--memory-lengths", type=int, nargs="*", default=[])
    args = parser.parse_args()
    variants = [
        "default",
        "importance_P16",
        "importance_P8",
        "importance_P16_overlap",
        "importance_P8_overlap",
        *(f"top_n_{name}" for name in args.top_n),
    ]
    budget_names = {f"budget_{budget}": budget_select(budget) for budget in args.budgets}
    if args.budgets:
        budget_names["one_launch"] = one_launch_select
    names = ["triton", *([] if args.budgets_only else variants), *budget_names]
    report = dict(
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        command="PYTHONPATH=$PWD python3 experiments/bench_importance.py " + " ".join(sys.argv[1:]),
        rounds=args.rounds,
        names=names,
        checks=[],
        timing={},
        memory=[],
    )
    if not args.skip_checks:
        report["checks"] = [check(5000, 128), check(5000, 192), check(65536, 192)]
    for dk in args.dks:
        q, k, lse = bsb.inputs(65536, dk)
        calls = {
            "triton": (jax.jit(triton_select), (q, k, lse)),
            "default": (jax.jit(default_select), (q, k, lse)),
            "importance_P16": (jax.jit(importance(16)), (q, k, lse)),
            "importance_P8": (jax.jit(importance(8)), (q, k, lse)),
            "importance_P16_overlap": (jax.jit(importance(16, overlap=True)), (q, k, lse)),
            "importance_P8_overlap": (jax.jit(importance(8, overlap=True)), (q, k, lse)),
        }
        if args.budgets_only:
            calls = {"triton": calls["triton"]}
        else:
            scores = jax.jit(importance(block_importance_mosaic.default_tuning(dk).positions))(q, k, lse)
            for name in args.top_n:
                calls[f"top_n_{name}"] = (jax.jit(picks_of(TOP_N[name])), (scores,))
        temp_mib = {}
        for name, select in budget_names.items():
            compiled, temp_mib[name] = compiled_with_memory(select, q, k, lse)
            calls[name] = (compiled, (q, k, lse))
        times = alternating_rounds(calls, rounds=args.rounds, iters=args.iters)
        compared = "default" if "default" in calls else next(iter(budget_names), "triton")
        compared_picks = np.asarray(calls[compared][0](q, k, lse))
        unlike = np.any(np.asarray(calls["triton"][0](q, k, lse)) != compared_picks, -1)
        for name in budget_names:
            if not np.array_equal(np.asarray(calls[name][0](q, k, lse)), compared_picks):
                raise AssertionError(f"{name}'s picks differ from {compared}'s")
        report["timing"][str(dk)] = dict(ms=times, rows_unlike_triton=int(unlike.sum()), temp_mib=temp_mib)
        print(dk, {name: round(float(np.median(v)), 3) for name, v in times.items()}, flush=True)
        write_report(args.out, "bench_importance", report, markdown(report))
    for length in args.memory_lengths:
        report["memory"].append(memory_at(length, rounds=args.rounds, iters=args.iters))
        write_report(args.out, "bench_importance", report, markdown(report))
    write_report(args.out, "bench_importance", report, markdown(report))
    passed = all(c["ok"] for c in report["checks"]) and all(m["picks_equal"] for m in report["memory"])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
