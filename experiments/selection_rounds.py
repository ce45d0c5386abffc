"""Selected-attention variants against each other at one length, in interleaved rounds.

    PYTHONPATH=$PWD python3 experiments/selection_rounds.py --out DIR [--length 65536] [--rounds 3]
        [--iters 5] [--variants default forced_merge ...] [--forced-blocks]

For each head-dim config of :data:`experiments.selection_inputs.VARIANTS` (G=16 with Dk=192/Dv=128
and with D=128), the named variants (``default`` is ``tuning_for``'s) run forward and
forward+backward on the same inputs (:func:`experiments.bench_selection.make_inputs`: bf16, B=1,
HQ=64, H=4, n=16 blocks of 64). ``--forced-blocks`` puts block 0 and both local blocks in every
selection, as the spec's top-n does (Eq. 11); without it, only the query's own block is certain.

- Times: :func:`experiments.measure.alternating_rounds` over every (variant, direction), medians.
- Agreement: each variant's output and gradients against the first variant's (relative error).
- Kernels: one forward call of each variant from a profile, summed by kernel name.

Needs a GPU (the kernels are compiled). Writes ``selection_rounds.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys

import jax
import jax.numpy as jnp

from experiments.bench_selection import CONFIGS, make_inputs, ours
from experiments.measure import alternating_rounds, gpu_events, relative_error, write_report
from experiments.selection_inputs import VARIANTS, unknown_variants

ON_GPU = jax.default_backend() == "gpu"
DIRECTIONS = ("fwd", "fwd_bwd")


def forward_backward(fn):
    """``fn``'s gradients in q, k, v for a cotangent, jitted: ``(q, k, v, ct, indices) -> (dq, dk, dv)``."""

    def run(q, k, v, ct, indices):
        return jax.vjp(lambda q, k, v: fn(q, k, v, indices), q, k, v)[1](ct)

    return jax.jit(run)


def config_rounds(
    config: str, variants: list[str], length: int, rounds: int, iters: int, forced: bool, top: int = 8
) -> dict:
    """One config's times (ms per round), agreement with the first variant and forward kernels."""
    q_heads, kv_heads, dk, dv = CONFIGS[config]
    q, k, v, ct, indices = make_inputs(
        length, q_heads, kv_heads, dk, dv, first_block=forced, previous_block=forced
    )
    calls, agreement, first = {}, {}, None
    for name in variants:
        forward, backward = (
            jax.jit(ours(VARIANTS[config][name])),
            forward_backward(ours(VARIANTS[config][name])),
        )
        calls[f"{name}/fwd"] = (forward, (q, k, v, indices))
        calls[f"{name}/fwd_bwd"] = (backward, (q, k, v, ct, indices))
        results = (forward(q, k, v, indices), *backward(q, k, v, ct, indices))
        finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in results)
        if first is None:
            first = results
        errors = {
            n: relative_error(x, r) for n, x, r in zip(("out", "dq", "dk", "dv"), results, first, strict=True)
        }
        agreement[name] = {**errors, "finite": finite}
        print(config, name, agreement[name], flush=True)
    del first, results
    times = alternating_rounds(calls, rounds, iters)
    kernels = {}
    for name in variants:
        by_name = collections.defaultdict(float)
        for event in gpu_events(*calls[f"{name}/fwd"]):
            by_name[event["name"]] += event["duration_us"] / 1e3
        kernels[name] = dict(sorted(by_name.items(), key=lambda item: -item[1])[:top])
    return {"config": config, "ms": times, "agreement": agreement, "fwd_kernels_ms": kernels}


def markdown(report: dict) -> str:
    lines = [
        f"# Selected-attention variants at T={report['length']}, interleaved rounds",
        "",
        f"Device: {report['device']}; jax {report['jax']}; command: `{report['command']}`.",
        f"bf16, B=1, HQ=64, H=4, n=16 blocks of 64; {report['rounds']} rounds; ms are medians over the "
        "rounds; selections: "
        + (
            "block 0 and both local blocks in every one (Eq. 11)."
            if report["forced_blocks"]
            else "random causal."
        ),
        "",
        "| config | variant | fwd | fwd+bwd | out / dq / dk / dv against the first variant |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for name, errors in row["agreement"].items():
            ms = [statistics.median(row["ms"][f"{name}/{direction}"]) for direction in DIRECTIONS]
            diffs = " / ".join(f"{errors[key]:.1e}" for key in ("out", "dq", "dk", "dv"))
            lines.append(f"| {row['config']} | {name} | {ms[0]:.2f} | {ms[1]:.2f} | {diffs} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["default", "forced_merge"])
    parser.add_argument(
        "--forced-blocks", action="store_true", help="Eq. 11's three blocks in every selection"
    )
    args = parser.parse_args()
    unknown = unknown_variants(args.variants)
    if unknown:
        parser.error(f"--variants must name VARIANTS of both head-dim configs, got {unknown}")
    if not ON_GPU:
        raise SystemExit("selection_rounds.py needs a GPU: it times compiled kernels")
    rows = [
        config_rounds(config, args.variants, args.length, args.rounds, args.iters, args.forced_blocks)
        for config in VARIANTS
    ]
    report = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "command": "PYTHONPATH=$PWD python3 " + " ".join(sys.argv),
        "length": args.length,
        "rounds": args.rounds,
        "forced_blocks": args.forced_blocks,
        "rows": rows,
    }
    write_report(args.out, "selection_rounds", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
