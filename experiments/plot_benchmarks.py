"""Plots of the op and decode benchmarks, drawn from the JSON their scripts write.

    python -m experiments.plot_benchmarks \
        --layer experiments/results/layer_session17_h200.json \
        --decode experiments/results/decode_session17_h200.json --out experiments/results

``--layer`` takes ``layer.json`` from ``experiments/bench_layer.py`` (its ``time`` part) and
writes ``op_<device>.png``: forward and forward+backward time of one NSA op against cuDNN
dense causal attention over the sequence length, with the ratio at each point, and the time
of each branch alone. ``--decode`` takes ``decode_<backend>.json`` from
``experiments/bench_decode.py`` and writes ``decode_<device>.png``: ms per decode step
against dense decode over the cached length at each batch, with the speed-up against the
faster dense step, and the bytes a step reads. The figures show what the JSON holds; nothing
is measured here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

# Branches of the op in the order Eq. 5 lists them, with select_blocks between the
# compressed branch that scores blocks and the selected branch that reads them.
BRANCHES = ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention")
BRANCH_LABELS = {
    "compressed_attention": "compressed",
    "select_blocks": "select_blocks (no backward)",
    "selected_attention": "selected",
    "sliding_window_attention": "window",
    "combine": "gates (Eq. 5)",
}
BRANCH_COLORS = ("tab:purple", "tab:olive", "tab:green", "tab:red", "tab:gray")
PASSES = (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward+backward"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _device_stem(report: dict[str, Any]) -> str:
    return report.get("device", "device").replace("NVIDIA ", "").replace(" ", "_").lower()


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 else str(tokens)


def _require(report: dict[str, Any], key: str, argument: str) -> list[dict[str, Any]]:
    rows = report.get(key)
    if not rows:
        raise ValueError(f"{argument} must hold a non-empty {key!r} list, as its benchmark writes it")
    return rows


def dense_peer_name(row: dict[str, Any]) -> str:
    """Key of the dense peer in a ``bench_layer.py`` time row (or in ``bench_layer.dense_peers``):
    cuDNN with the op's own head dims, ``cudnn_dense_native_dv`` (Dv != Dk through cuDNN's native
    path) where the row holds one, else ``cudnn_dense``."""
    return "cudnn_dense_native_dv" if row.get("cudnn_dense_native_dv") else "cudnn_dense"


def dense_peer(row: dict[str, Any]) -> dict[str, float]:
    """The dense peer's timings in a time row (:func:`dense_peer_name`)."""
    return row[dense_peer_name(row)]


def _label_points(ax, xs, ys, texts, color: str, series: int) -> None:
    """Writes ``texts`` at the points, above them for even ``series`` and below for odd ones, so
    that two series close together keep their labels apart."""
    lift = 7 if series % 2 == 0 else -14
    for x, y, text in zip(xs, ys, texts, strict=True):
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(0, lift), ha="center", fontsize=8, color=color
        )


def _log_lengths_axes(ax, lengths: list[int], *, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes with one tick per measured length, the values written out (not 10^x)."""
    from matplotlib.ticker import ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [_length_label(t) for t in lengths])
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.margins(x=0.08, y=0.12)  # room for the point labels at the ends
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _stage_times(row: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Each branch's time alone under its default implementation, then the gates' combine.
    select_blocks has no backward: its forward is its share of forward+backward."""
    stages = [(branch, row["ops"][branch][row["defaults"][branch]]) for branch in BRANCHES]
    return [*stages, ("combine", row["combine"])]


def plot_op(report: dict[str, Any], path: pathlib.Path) -> None:
    """Writes the op figure of a ``bench_layer.py`` report with a ``time`` part."""
    rows = _require(report, "time", "--layer")
    configs = sorted({(r["Dk"], r["Dv"]) for r in rows}, reverse=True)
    lengths = sorted({r["T"] for r in rows})
    by_key = {(r["Dk"], r["Dv"], r["T"]): r for r in rows}
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, (key, title) in enumerate(PASSES):
        ax = axes[0, column]
        for series, (color, (dk, dv)) in enumerate(zip(colors, configs, strict=False)):
            present = [t for t in lengths if (dk, dv, t) in by_key]
            nsa = [by_key[dk, dv, t]["nsa"][key] for t in present]
            dense = [dense_peer(by_key[dk, dv, t])[key] for t in present]
            ax.plot(present, nsa, "o-", color=color, label=f"NSA, Dk={dk}/Dv={dv}")
            ax.plot(present, dense, "s--", color=color, alpha=0.6, label=f"cuDNN dense, Dk={dk}/Dv={dv}")
            _label_points(
                ax, present, nsa, [f"{d / n:.2f}x" for n, d in zip(nsa, dense, strict=True)], color, series
            )
        _log_lengths_axes(
            ax,
            lengths,
            xlabel="sequence length T",
            ylabel="ms",
            title=f"{title}: NSA op vs dense (dense / NSA)",
        )

        ax = axes[1, column]
        positions, labels = [], []
        width = 0.8 / len(configs)
        for index, t in enumerate(lengths):
            for offset, (dk, dv) in enumerate(configs):
                row = by_key.get((dk, dv, t))
                if row is None:
                    continue
                x = index + (offset - (len(configs) - 1) / 2) * width
                bottom = 0.0
                first = index == 0 and offset == 0
                for color, (stage, times) in zip(BRANCH_COLORS, _stage_times(row), strict=True):
                    value = times.get(key, times["fwd_ms"])
                    label = BRANCH_LABELS[stage] if first else None
                    ax.bar(x, value, width * 0.9, bottom=bottom, color=color, label=label)
                    bottom += value
                ax.plot(
                    [x - width * 0.45, x + width * 0.45],
                    [row["nsa"][key]] * 2,
                    "k-",
                    linewidth=2,
                    label="whole op" if first else None,
                )
                positions.append(x)
                labels.append(f"{_length_label(t)}\n{dk}/{dv}")
        ax.set_xticks(positions, labels, fontsize=8)
        ax.set(ylabel="ms", title=f"{title}: each branch alone (default implementations)")
        ax.legend(fontsize=8)
    heads = report.get("heads", {})
    fig.suptitle(
        f"One NSA attention op, B=1, HQ={heads.get('q_heads', '?')}, H={heads.get('kv_heads', '?')}, "
        f"l=32 d=16 l'=64 n=16 w=512, bf16; {report.get('device', '?')}, jax {report.get('jax', '?')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nsa_dims(row: dict[str, Any]) -> list[tuple[int, int]]:
    dims = []
    for key in row:
        if key.startswith("nsa_dk") and key.endswith("_new_ms"):
            dk, dv = key[len("nsa_dk") : -len("_new_ms")].split("_dv")
            dims.append((int(dk), int(dv)))
    return sorted(dims, reverse=True)


def _matched_dense(
    rows: list[dict[str, Any]], dk: int, dv: int, unit: str, scale: float
) -> list[float] | None:
    """The dense step with the NSA step's head dims (``dense_cudnn_dk{Dk}_dv{Dv}_{unit}``, which
    bench_decode.py times where they differ from 128/128), scaled; ``None`` where absent."""
    key = f"dense_cudnn_dk{dk}_dv{dv}_{unit}"
    if not all(key in r for r in rows):
        return None
    return [r[key] * scale for r in rows]


def _plot_nsa_series(
    ax,
    rows: list[dict[str, Any]],
    dims,
    colors,
    *,
    unit: str,
    scale: float,
    fallback: list[float],
    suffix: str,
) -> None:
    """Each NSA head-dim pair's ``unit`` (``"ms"``: its step time, ``"bytes"``: its bytes a step)
    over the rows' lengths, labelled with the ratio of its peer to it: dense with the same head dims
    where bench_decode.py timed it (drawn too), ``fallback`` (dense D=128) elsewhere."""
    lengths = [r["S"] for r in rows]
    for series, (color, (dk, dv)) in enumerate(zip(colors, dims, strict=False)):
        key = f"nsa_dk{dk}_dv{dv}_new_ms" if unit == "ms" else f"nsa_dk{dk}_dv{dv}_bytes"
        nsa = [r[key] * scale for r in rows]
        ax.plot(lengths, nsa, "o-", color=color, label=f"NSA, Dk={dk}/Dv={dv}")
        peer = _matched_dense(rows, dk, dv, unit, scale) or fallback
        if peer is not fallback:
            ax.plot(lengths, peer, "s--", color=color, alpha=0.5, label=f"dense, cudnn, Dk={dk}/Dv={dv}")
        texts = [f"{d / n:.1f}{suffix}" for n, d in zip(nsa, peer, strict=True)]
        _label_points(ax, lengths, nsa, texts, color, series)


def plot_decode(report: dict[str, Any], path: pathlib.Path) -> None:
    """Writes the decode figure of a ``bench_decode.py`` report."""
    rows = _require(report, "rows", "--decode")
    batches = sorted({r["B"] for r in rows}, reverse=True)
    dims = _nsa_dims(rows[0])
    dense_paths = [name for name in ("cudnn", "xla") if f"dense_{name}_ms" in rows[0]]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(6 * (len(batches) + 1), 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, batch in zip(axes, batches, strict=False):
        chosen = sorted((r for r in rows if r["B"] == batch), key=lambda r: r["S"])
        lengths = [r["S"] for r in chosen]
        best_dense = [min(r[f"dense_{name}_ms"] for name in dense_paths) * 1e3 for r in chosen]
        for style, name in zip(("s--", "^:"), dense_paths, strict=False):
            dense = [r[f"dense_{name}_ms"] * 1e3 for r in chosen]
            ax.plot(lengths, dense, style, color="gray", label=f"dense, {name}")
        _plot_nsa_series(ax, chosen, dims, colors, unit="ms", scale=1e3, fallback=best_dense, suffix="x")
        _log_lengths_axes(
            ax,
            lengths,
            xlabel="cached length S",
            ylabel="us per step",
            title=f"B={batch}: speed-up against dense of the same head dims",
        )
    ax = axes[-1]
    chosen = sorted((r for r in rows if r["B"] == batches[0]), key=lambda r: r["S"])
    lengths = [r["S"] for r in chosen]
    dense = [r["dense_bytes"] / 1e6 for r in chosen]
    ax.plot(lengths, dense, "s--", color="gray", label="dense")
    _plot_nsa_series(ax, chosen, dims, colors, unit="bytes", scale=1e-6, fallback=dense, suffix="x less")
    _log_lengths_axes(
        ax,
        lengths,
        xlabel="cached length S",
        ylabel="MB read per step (from the shapes)",
        title=f"B={batches[0]}: key/value bytes a step must read",
    )
    fig.suptitle(
        "Decode step, HQ=64, H=4, l=32 d=16 l'=64 n=16 w=512, bf16 cache. Dense: the faster of cuDNN and XLA "
        "at D=128 (gray), cuDNN's Dv != Dk path at other head dims.\n"
        f"{report.get('device', '?')}, jax {report.get('jax', '?')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layer", type=pathlib.Path, help="layer.json of bench_layer.py (with its time part)"
    )
    parser.add_argument("--decode", type=pathlib.Path, help="decode_<backend>.json of bench_decode.py")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."), help="folder for the PNGs")
    args = parser.parse_args(argv)
    if args.layer is None and args.decode is None:
        parser.error("give --layer, --decode or both")
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for source, prefix, plot in ((args.layer, "op", plot_op), (args.decode, "decode", plot_decode)):
        if source is None:
            continue
        report = json.loads(source.read_text())
        path = args.out / f"{prefix}_{_device_stem(report)}.png"
        plot(report, path)
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
