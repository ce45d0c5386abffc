"""Issue 4's ratios (dense cuDNN / NSA op) from interleaved rounds, with their spread.

    PYTHONPATH=$PWD python3 experiments/ratio_rounds.py --out DIR [--lengths 65536] [--rounds 6] [--iters 5]

``bench_layer.py --parts time`` times the op, then its branches, then the dense peer, once each.
The peer, last, runs after minutes of load, and its time moved by 3% between runs (sessions 16,
17, 23) while the op's moved by under 1%. That spread is as large as forward+backward's margin
over issue 4's 5x. Here the op (``nsa_attention``, paper geometry, as ``bench_layer``'s ``time``
part) and its dense peer (:func:`experiments.bench_layer.dense_peers`, cuDNN with the op's head
dims) are timed in alternating rounds (:func:`experiments.measure.alternating_rounds`), forward
and forward+backward, at Dk=192/Dv=128 and Dk=Dv=128. Each round gives one ratio for each;
the report gives every round's ratio, their median, and the lowest and highest.

Needs a GPU (the peer is cuDNN). Writes ``ratio_rounds.json`` and ``ratio_rounds.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax

from experiments.bench_layer import (
    HEAD_DIMS,
    NSA_INPUTS,
    ON_GPU,
    PAPER,
    dense_peers,
    iterations,
    nsa_op,
    op_inputs,
    with_vjp,
)
from experiments.measure import alternating_rounds, write_report
from experiments.plot_benchmarks import dense_peer_name

MODES = ("fwd", "fwd_bwd")


def ratio_row(length: int, dk: int, dv: int, rounds: int, iters: int) -> dict:
    """Per-round times (ms) of the op and its peer, forward and forward+backward, and the ratios."""
    x = op_inputs(length, dk, dv, PAPER)
    peers = dense_peers(length, dk, dv)
    peer = dense_peer_name(peers)
    peer_fn, peer_args, peer_cotangent = peers[peer]
    nsa_args = tuple(x[name] for name in NSA_INPUTS)
    calls = {
        "nsa_fwd": (jax.jit(nsa_op), nsa_args),
        "nsa_fwd_bwd": (with_vjp(nsa_op, len(NSA_INPUTS)), (*nsa_args, x["cotangent"])),
        "dense_fwd": (jax.jit(peer_fn), peer_args),
        "dense_fwd_bwd": (with_vjp(peer_fn, 3), (*peer_args, peer_cotangent)),
    }
    times = alternating_rounds(calls, rounds, iterations(length, iters))
    row = {"T": length, "Dk": dk, "Dv": dv, "peer": peer, "ms": times}
    for mode in MODES:
        row[f"{mode}_ratios"] = ratio_summary(times[f"dense_{mode}"], times[f"nsa_{mode}"])
    return row


def ratio_summary(dense_ms: list[float], nsa_ms: list[float]) -> dict:
    """Each round's ``dense / nsa``, and their median, lowest and highest."""
    if len(dense_ms) != len(nsa_ms) or not nsa_ms:
        raise ValueError(f"need one time of each per round, got {len(dense_ms)} and {len(nsa_ms)}")
    ratios = [dense / nsa for dense, nsa in zip(dense_ms, nsa_ms, strict=True)]
    return {"rounds": ratios, "median": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}


def markdown(report: dict) -> str:
    lines = [
        "# Dense cuDNN / NSA op, interleaved rounds",
        "",
        f"Device: {report['device']}; jax {report['jax']}; command: `{report['command']}`.",
        f"Paper geometry, B=1, bf16; {report['rounds']} rounds; ms are medians over the rounds.",
        "",
        "| T | Dk/Dv | NSA fwd / fwd+bwd | dense fwd / fwd+bwd | fwd ratio, median (low-high) "
        "| fwd+bwd ratio, median (low-high) |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ms = {name: statistics.median(values) for name, values in row["ms"].items()}
        ratios = [row[f"{mode}_ratios"] for mode in MODES]
        lines.append(
            f"| {row['T']} | {row['Dk']}/{row['Dv']} | {ms['nsa_fwd']:.2f} / {ms['nsa_fwd_bwd']:.2f} "
            f"| {ms['dense_fwd']:.2f} / {ms['dense_fwd_bwd']:.2f} "
            + "".join(f"| {r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f}) " for r in ratios)
            + "|"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--iters", type=int, default=5, help="timed calls a round (halved past 16K, at least 3)"
    )
    args = parser.parse_args()
    if not ON_GPU:
        raise SystemExit("ratio_rounds.py needs a GPU: the dense peer is cuDNN")
    if args.rounds < 1 or args.iters < 1:
        raise ValueError(f"--rounds and --iters must be >= 1, got {args.rounds} and {args.iters}")
    rows = []
    for length in args.lengths:
        for dk, dv in HEAD_DIMS.values():
            rows.append(ratio_row(length, dk, dv, args.rounds, args.iters))
            print(rows[-1], flush=True)
    report = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "command": "PYTHONPATH=$PWD python3 " + " ".join(sys.argv),
        "rounds": args.rounds,
        "rows": rows,
    }
    write_report(args.out, "ratio_rounds", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
