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

``--flash-attention-2`` adds torch SDPA's FlashAttention-2 forward (the paper's peer for its
9.0x forward; torch with CUDA needed) to the same rounds: causal, K/V repeated to the query heads,
V zero-padded to Dk where Dv differs (FlashAttention-2 takes one head dim). Its rows report
FlashAttention-2 / NSA forward.

``--selection-variants NAME ...`` adds the op with its selected branch at each named tuning of
:data:`experiments.selection_inputs.VARIANTS` (for the row's head dims) to the same rounds, so that
a variant and the default are compared against one peer measured alongside both.

Needs a GPU (the peer is cuDNN). Writes ``ratio_rounds.json`` and ``ratio_rounds.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable

import jax

import nsa_jax
from experiments.bench_layer import (
    HEAD_DIMS,
    HEADS,
    NSA_INPUTS,
    ON_GPU,
    PAPER,
    dense_peers,
    iterations,
    nsa_op,
    op_inputs,
    with_vjp,
)
from experiments.bench_selection import variant_tuning
from experiments.measure import alternating_rounds, write_report
from experiments.plot_benchmarks import dense_peer_name
from experiments.selection_inputs import unknown_variants
from nsa_jax import registry
from pallas_kernels.gpu import selection

MODES = ("fwd", "fwd_bwd")


def variant_op(name: str, dk: int) -> Callable:
    """``nsa_op`` with the selected branch at ``VARIANTS``' tuning ``name`` for head dim ``dk``,
    registered as its own ``selected_attention`` implementation (GPU, as ``pallas_triton``)."""
    tuning = variant_tuning("G16_D192_128" if dk == 192 else "G16_D128", name)
    if tuning is None:
        raise ValueError(f"--selection-variants: no variant {name!r} for Dk={dk}")
    implementation = f"pallas_triton[{name},dk={dk}]"
    registry.register(
        registry.Implementation(
            op="selected_attention",
            name=implementation,
            fn=functools.partial(selection.selected_attention, tuning=tuning),
            platforms=("gpu",),
            check=selection.check,
        )
    )

    def op(*arrays: jax.Array) -> jax.Array:
        return nsa_jax.nsa_attention(*arrays, **PAPER, implementation={"selected_attention": implementation})

    return op


def flash_attention_2_forward(length: int, dk: int, dv: int) -> Callable[[], None]:
    """A call of torch SDPA's FlashAttention-2 forward on random bf16 inputs of the op's shape
    (module notes), synchronised so that it times as a JAX call waited for."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    if not torch.cuda.is_available():
        raise SystemExit("--flash-attention-2 needs torch with CUDA")
    q_heads, kv_heads = HEADS["q_heads"], HEADS["kv_heads"]
    width = max(dk, dv)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def normal(heads: int) -> torch.Tensor:
        shape = (1, heads, length, width)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)

    q = normal(q_heads)
    k, v = (normal(kv_heads).repeat_interleave(q_heads // kv_heads, dim=1) for _ in range(2))

    def forward() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()

    return forward


def ratio_row(
    length: int,
    dk: int,
    dv: int,
    rounds: int,
    iters: int,
    variants: tuple[str, ...] = (),
    flash_attention_2: bool = False,
) -> dict:
    """Per-round times (ms) of the op (and of its ``variants``) and its peer, forward and
    forward+backward, and the ratios; with ``flash_attention_2`` also FlashAttention-2's forward."""
    x = op_inputs(length, dk, dv, PAPER)
    peers = dense_peers(length, dk, dv)
    peer = dense_peer_name(peers)
    peer_fn, peer_args, peer_cotangent = peers[peer]
    nsa_args = tuple(x[name] for name in NSA_INPUTS)
    ops = {"nsa": nsa_op, **{f"nsa[{name}]": variant_op(name, dk) for name in variants}}
    calls = {}
    for label, op in ops.items():
        calls[f"{label}_fwd"] = (jax.jit(op), nsa_args)
        calls[f"{label}_fwd_bwd"] = (with_vjp(op, len(NSA_INPUTS)), (*nsa_args, x["cotangent"]))
    calls["dense_fwd"] = (jax.jit(peer_fn), peer_args)
    calls["dense_fwd_bwd"] = (with_vjp(peer_fn, 3), (*peer_args, peer_cotangent))
    if flash_attention_2:
        calls["fa2_fwd"] = (flash_attention_2_forward(length, dk, dv), ())
    times = alternating_rounds(calls, rounds, iterations(length, iters))
    row = {"T": length, "Dk": dk, "Dv": dv, "peer": peer, "ms": times, "ops": list(ops)}
    if flash_attention_2:
        row["fa2_fwd_ratios"] = ratio_summary(times["fa2_fwd"], times["nsa_fwd"])
    for label in ops:
        prefix = "" if label == "nsa" else f"{label}_"
        for mode in MODES:
            row[f"{prefix}{mode}_ratios"] = ratio_summary(times[f"dense_{mode}"], times[f"{label}_{mode}"])
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
        for label in row.get("ops", ["nsa"]):
            prefix = "" if label == "nsa" else f"{label}_"
            ratios = [row[f"{prefix}{mode}_ratios"] for mode in MODES]
            name = "" if label == "nsa" else f" {label[4:-1]}"
            lines.append(
                f"| {row['T']} | {row['Dk']}/{row['Dv']}{name} "
                f"| {ms[f'{label}_fwd']:.2f} / {ms[f'{label}_fwd_bwd']:.2f} "
                f"| {ms['dense_fwd']:.2f} / {ms['dense_fwd_bwd']:.2f} "
                + "".join(f"| {r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f}) " for r in ratios)
                + "|"
            )
    fa2_rows = [row for row in report["rows"] if "fa2_fwd_ratios" in row]
    if fa2_rows:
        lines += [
            "",
            "torch SDPA FlashAttention-2 forward in the same rounds (V zero-padded to Dk where Dv differs):",
            "",
            "| T | Dk/Dv | NSA fwd | FlashAttention-2 fwd | ratio, median (low-high) |",
            "|---|---|---|---|---|",
        ]
        for row in fa2_rows:
            ratio = row["fa2_fwd_ratios"]
            lines.append(
                f"| {row['T']} | {row['Dk']}/{row['Dv']} | {statistics.median(row['ms']['nsa_fwd']):.2f} "
                f"| {statistics.median(row['ms']['fa2_fwd']):.2f} "
                f"| {ratio['median']:.2f}x ({ratio['low']:.2f}-{ratio['high']:.2f}) |"
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
    parser.add_argument(
        "--flash-attention-2",
        action="store_true",
        help="also time torch SDPA FlashAttention-2's forward in the rounds (needs torch with CUDA)",
    )
    parser.add_argument(
        "--selection-variants",
        nargs="*",
        default=[],
        help="VARIANTS names (experiments/selection_inputs.py) whose op also runs in the rounds",
    )
    args = parser.parse_args()
    unknown = unknown_variants(args.selection_variants)
    if unknown:
        parser.error(f"--selection-variants must name VARIANTS of both head-dim configs, got {unknown}")
    if not ON_GPU:
        raise SystemExit("ratio_rounds.py needs a GPU: the dense peer is cuDNN")
    if args.rounds < 1 or args.iters < 1:
        raise ValueError(f"--rounds and --iters must be >= 1, got {args.rounds} and {args.iters}")
    rows = []
    for length in args.lengths:
        for dk, dv in HEAD_DIMS.values():
            rows.append(
                ratio_row(
                    length,
                    dk,
                    dv,
                    args.rounds,
                    args.iters,
                    tuple(args.selection_variants),
                    args.flash_attention_2,
                )
            )
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
