"""Lower bounds on the op's forward time, branch by branch, against issue 4's 6x forward target.

    python -m experiments.forward_bounds --layer experiments/results/layer_session17_h200.json --out DIR

Reads the ``time`` rows of a ``bench_layer.py`` report (B=1, paper geometry: the dense cuDNN
forward and each branch's measured forward) and counts, from the shapes and the spec's rules,
the least work each branch of the forward must do on random inputs:

- compressed (Eqs. 7-8): ``2 HQ (Dk + Dv)`` flops per visible (query, compressed token) pair;
  ``floor((t - l + 1) / d) + 1`` tokens are visible at ``t >= l - 1`` (spec, "Compression branch");
- select_blocks (Eqs. 9-11): Eq. 9 needs the probabilities normalised by the compressed branch's
  log-sum-exp, which is known only after the last visible token. Two designs:
  - *two passes* (this project's): the compressed ``q . k`` again, ``2 HQ Dk`` flops a visible pair;
  - *one pass*, inside the compressed branch: each (position, query head) keeps its importance of
    every visible selection block (``t // l' + 1`` at ``t``) unnormalised, in float32 as exact
    ties need, and rescales them once its log-sum-exp is known. Per program that is 256 KB for
    64 rows (four positions) at 64K, more than an SM's shared memory, so they cross HBM twice.
  The bound is the faster of the two;
- window: ``2 HQ (Dk + Dv)`` flops per key, ``min(t + 1, w)`` keys at ``t``;
- selected (Eq. 12): ``min(n, t // l' + 1)`` blocks at ``t``, the block holding ``t`` among them
  (a forced local block) with its ``t % l' + 1`` keys up to ``t``, the others whole. On random
  inputs two positions share only the forced blocks, so each (position, KV head) moves its own
  blocks. Two designs and the bytes each must move:
  - *keys to the queries* (this project's kernel): each selected key's ``Dk + Dv`` values,
    from L2 to the SMs, once per (position, KV head);
  - *queries to the keys* (a key block's program streams the positions that picked it): per
    (position, KV head, picked block) the ``G`` heads' query rows in (``Dk``), their partial
    outputs out and back in for the merge (``2 Dv``); partial outputs (``T H (n - 3) G Dv``
    values, 14 GB at 64K) do not fit in L2, so they cross HBM twice. The forced blocks (the
    initial one and the two local ones, spec Eq. 11) are the same for the ``l'`` positions of a
    block, so the merge can attend them itself and read their keys once per block of positions.
  The bound is the faster of the two, each at its memory ceiling, with no compute cost.

Each bound is ``work / ceiling``. Two sets of ceilings:

- *device*: ``--gemm-tflops`` (788 TFLOP/s, an 8192^3 bf16 matrix product on this H200, device
  KINDS.md), ``--hbm-tbs`` (4.8 TB/s, the datasheet; a copy measures 4.3), ``--l2-tbs`` (10.7
  TB/s: under ncu the selected forward moved its 137 GB in 14.87 ms, 9.2 TB/s, at 86% of the L2
  throughput ncu reports; session 16);
- *cuDNN*: the three attention branches at the flop rate cuDNN reaches on the compressed branch in
  the same report (the best attention kernel measured on this chip), the selected branch as above.

Against the dense peer's own efficiency: the peer's forward does ``2 HQ (Dk + Dv) T (T + 1) / 2``
flops, and its share of the GEMM ceiling is its efficiency. The sum at the device's ceilings over
the 6x budget is the efficiency every branch would need, on average, to reach 6x; the sum over the
peer's efficiency is the op's least time if its kernels were as close to the ceilings as the peer.

The bounds add up because running branches at the same time gains nothing here: each forward
branch alone draws the board's ~690 W power limit, and two at once (CUDA MPS, whole GPU or half
the SMs each) did 0.93-1.06 of the work of running them in turn (``overlap_probe.py``, session 22).
Writes ``forward_bounds.json`` and ``forward_bounds.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from experiments.bench_layer import PAPER
from experiments.check_compression_gpu import visible_compressed_tokens
from experiments.measure import write_report
from experiments.plot_benchmarks import dense_peer

BYTES_16BIT = 2
BYTES_FLOAT32 = 4
FORWARD_TARGET = 6.0


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Rates a bound divides work by: flop/s of the attention branches, bytes/s of memory."""

    attention_flops: float
    hbm_bytes: float
    l2_bytes: float


def window_keys(length: int, window: int) -> np.ndarray:
    """int64 ``[T]``: keys position ``t`` attends in the window branch."""
    return np.minimum(np.arange(length, dtype=np.int64) + 1, window)


def visible_selection_blocks(length: int, block_size: int) -> np.ndarray:
    """int64 ``[T]``: selection blocks ``j`` with ``j l' <= t``, those Eq. 9 scores at ``t``."""
    return np.arange(length, dtype=np.int64) // block_size + 1


def selected_blocks(length: int, block_size: int, num_selected: int) -> np.ndarray:
    """int64 ``[T]``: blocks position ``t`` attends in the selected branch."""
    return np.minimum(visible_selection_blocks(length, block_size), num_selected)


def forced_blocks(length: int, block_size: int, initial: int = 1, local: int = 2) -> np.ndarray:
    """int64 ``[T]``: visible blocks that Eq. 11 always selects at ``t``: ``j < initial`` or
    ``j > t // l' - local``."""
    current = np.arange(length, dtype=np.int64) // block_size
    return current + 1 - np.maximum(0, current - local - initial + 1)


def dense_causal_flops(length: int, q_heads: int, dk: int, dv: int) -> int:
    """Flops of dense causal attention's forward: ``2 HQ (Dk + Dv)`` per (query, key <= query) pair."""
    return 2 * q_heads * (dk + dv) * length * (length + 1) // 2


def selected_keys(length: int, block_size: int, num_selected: int) -> np.ndarray:
    """int64 ``[T]``: keys position ``t`` attends in the selected branch: its own block's keys up to
    ``t`` and the other picked blocks whole."""
    t = np.arange(length, dtype=np.int64)
    return (selected_blocks(length, block_size, num_selected) - 1) * block_size + t % block_size + 1


def branch_work(length: int, q_heads: int, kv_heads: int, dk: int, dv: int, geometry: dict) -> dict:
    """Flops of the compressed, select_blocks and window branches; the selected branch's flops and
    the bytes of its two designs (see the module notes)."""
    pairs = int(visible_compressed_tokens(length, geometry["block_length"], geometry["block_stride"]).sum())
    size, num_selected = geometry["selection_block_size"], geometry["num_selected"]
    keys = int(selected_keys(length, size, num_selected).sum())
    forced = forced_blocks(length, size)
    picked = int((selected_blocks(length, size, num_selected) - forced).sum())
    group = q_heads // kv_heads
    scored_blocks = int(visible_selection_blocks(length, size).sum())
    # The forced blocks' keys, once per l' positions and KV head.
    forced_keys = kv_heads * -(-length // size) * int(forced.max(initial=0)) * size
    return {
        "compressed_flops": 2 * q_heads * (dk + dv) * pairs,
        "select_flops": 2 * q_heads * dk * pairs,
        "select_one_pass_bytes": 2 * q_heads * BYTES_FLOAT32 * scored_blocks,
        "window_flops": 2 * q_heads * (dk + dv) * int(window_keys(length, geometry["window"]).sum()),
        "selected_flops": 2 * q_heads * (dk + dv) * keys,
        "selected_keys_to_queries_bytes": kv_heads * keys * (dk + dv) * BYTES_16BIT,
        "selected_queries_in_bytes": kv_heads * picked * group * dk * BYTES_16BIT,
        "selected_partials_bytes": 2 * kv_heads * picked * group * dv * BYTES_16BIT,
        "selected_forced_keys_bytes": forced_keys * (dk + dv) * BYTES_16BIT,
    }


def selected_designs_ms(work: dict, ceilings: Ceilings) -> dict[str, float]:
    """Least milliseconds of the selected branch in each design, with no compute cost."""
    partials = work["selected_partials_bytes"]
    through_l2 = partials + work["selected_queries_in_bytes"] + work["selected_forced_keys_bytes"]
    queries_to_keys = max(partials / ceilings.hbm_bytes, through_l2 / ceilings.l2_bytes)
    return {
        "keys_to_queries": 1e3 * work["selected_keys_to_queries_bytes"] / ceilings.l2_bytes,
        "queries_to_keys": 1e3 * queries_to_keys,
    }


def select_designs_ms(work: dict, ceilings: Ceilings) -> dict[str, float]:
    """Least milliseconds of select_blocks' scoring in each design (see the module notes)."""
    return {
        "two_passes": 1e3 * work["select_flops"] / ceilings.attention_flops,
        "one_pass": 1e3 * work["select_one_pass_bytes"] / ceilings.hbm_bytes,
    }


def bounds_ms(work: dict, ceilings: Ceilings) -> dict[str, float]:
    """Least milliseconds of each branch at these ceilings (select_blocks and selected: the faster
    design)."""
    return {
        "compressed": 1e3 * work["compressed_flops"] / ceilings.attention_flops,
        "select_blocks": min(select_designs_ms(work, ceilings).values()),
        "selected": min(selected_designs_ms(work, ceilings).values()),
        "window": 1e3 * work["window_flops"] / ceilings.attention_flops,
    }


def row_bounds(row: dict, heads: dict, device: Ceilings) -> dict:
    """One ``time`` row: the work, the bounds under both ceilings, the budget of the 6x target."""
    work = branch_work(row["T"], heads["q_heads"], heads["kv_heads"], row["Dk"], row["Dv"], PAPER)
    measured = {op: row["ops"][op][name]["fwd_ms"] for op, name in row["defaults"].items()}
    cudnn_rate = work["compressed_flops"] / (1e-3 * measured["compressed_attention"])
    at_cudnn = dataclasses.replace(device, attention_flops=cudnn_rate)
    out = {"T": row["T"], "Dk": row["Dk"], "Dv": row["Dv"], "work": work, "measured_ms": measured}
    out["cudnn_tflops"] = cudnn_rate / 1e12
    out["selected_designs_ms"] = selected_designs_ms(work, device)
    out["select_designs_ms"] = select_designs_ms(work, device)
    for name, ceilings in (("device", device), ("cudnn", at_cudnn)):
        parts = bounds_ms(work, ceilings)
        out[f"bounds_{name}_ms"] = parts
        out[f"sum_{name}_ms"] = sum(parts.values())
    out["nsa_fwd_ms"] = row["nsa"]["fwd_ms"]
    out["dense_fwd_ms"] = dense_peer(row)["fwd_ms"]
    out["budget_ms"] = out["dense_fwd_ms"] / FORWARD_TARGET
    dense_flops = dense_causal_flops(row["T"], heads["q_heads"], row["Dk"], row["Dv"])
    out["dense_tflops"] = dense_flops / (1e-3 * out["dense_fwd_ms"]) / 1e12
    out["dense_efficiency"] = out["dense_tflops"] * 1e12 / device.attention_flops
    out["efficiency_needed"] = out["sum_device_ms"] / out["budget_ms"]
    out["sum_at_dense_efficiency_ms"] = out["sum_device_ms"] / out["dense_efficiency"]
    out["ratio_at_dense_efficiency"] = out["dense_fwd_ms"] / out["sum_at_dense_efficiency_ms"]
    return out


def markdown(report: dict) -> str:
    c = report["ceilings"]
    lines = [
        f"# Least forward time of the NSA op against the {FORWARD_TARGET:g}x target",
        "",
        f"From `{report['layer']}` ({report['device']}); command: `{report['command']}`.",
        f"Device ceilings: {c['gemm_tflops']:g} TFLOP/s, HBM {c['hbm_tbs']:g} TB/s, L2 {c['l2_tbs']:g} TB/s.",
        "Bounds in ms, compressed + select_blocks + selected + window; budget = dense cuDNN forward / 6.",
        "",
        "| T | Dk/Dv | at device ceilings | sum | cuDNN TFLOP/s | at cuDNN's rate | sum | NSA measured "
        "| budget | sum / budget | selected: keys to queries / queries to keys | selected measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    efficiency = [
        "",
        "select_blocks' scoring (ms at the device's ceilings), two passes / one pass: "
        + "; ".join(
            f"T={r['T']} Dk={r['Dk']}: {r['select_designs_ms']['two_passes']:.2f} / "
            f"{r['select_designs_ms']['one_pass']:.2f}"
            for r in report["rows"]
        )
        + ".",
        "",
        "Against the dense peer's own efficiency (its forward's flops over its time, as a share of the "
        "GEMM ceiling):",
        "",
        "| T | Dk/Dv | dense TFLOP/s | dense efficiency | efficiency 6x needs | least NSA time at the dense "
        "efficiency | dense / NSA at best |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        efficiency.append(
            f"| {r['T']} | {r['Dk']}/{r['Dv']} | {r['dense_tflops']:.0f} | {r['dense_efficiency']:.0%} "
            f"| {r['efficiency_needed']:.0%} | {r['sum_at_dense_efficiency_ms']:.2f} "
            f"| {r['ratio_at_dense_efficiency']:.2f}x |"
        )
    for r in report["rows"]:
        device = " + ".join(f"{v:.2f}" for v in r["bounds_device_ms"].values())
        cudnn = " + ".join(f"{v:.2f}" for v in r["bounds_cudnn_ms"].values())
        designs = r["selected_designs_ms"]
        lines.append(
            f"| {r['T']} | {r['Dk']}/{r['Dv']} | {device} | {r['sum_device_ms']:.2f} "
            f"| {r['cudnn_tflops']:.0f} "
            f"| {cudnn} | {r['sum_cudnn_ms']:.2f} | {r['nsa_fwd_ms']:.2f} | {r['budget_ms']:.2f} "
            f"| {r['sum_device_ms'] / r['budget_ms']:.2f} / {r['sum_cudnn_ms'] / r['budget_ms']:.2f} "
            f"| {designs['keys_to_queries']:.2f} / {designs['queries_to_keys']:.2f} "
            f"| {r['measured_ms']['selected_attention']:.2f} |"
        )
    return "\n".join(lines + efficiency) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", required=True, help="a bench_layer.py JSON report with a 'time' part")
    parser.add_argument("--out", required=True)
    parser.add_argument("--gemm-tflops", type=float, default=788.0)
    parser.add_argument("--hbm-tbs", type=float, default=4.8)
    parser.add_argument("--l2-tbs", type=float, default=10.7)
    args = parser.parse_args()
    for name in ("gemm_tflops", "hbm_tbs", "l2_tbs"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    layer = json.loads(pathlib.Path(args.layer).read_text())
    if not layer.get("time"):
        raise ValueError(f"--layer {args.layer} has no 'time' rows (run bench_layer.py --parts time)")
    device = Ceilings(args.gemm_tflops * 1e12, args.hbm_tbs * 1e12, args.l2_tbs * 1e12)
    report = {
        "layer": args.layer,
        "device": layer.get("device", "?"),
        "command": layer.get("command", "?"),
        "ceilings": {"gemm_tflops": args.gemm_tflops, "hbm_tbs": args.hbm_tbs, "l2_tbs": args.l2_tbs},
        "rows": [row_bounds(row, layer["heads"], device) for row in layer["time"]],
    }
    write_report(args.out, "forward_bounds", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
