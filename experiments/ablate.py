"""NSA ablations: ``python -m experiments.ablate --preset cpu --variants full nsa no_window``.

Trains each variant with the same model size, data, steps and seed, then writes a
report into ``--out``: ``report.md`` (table), ``loss.png`` (training curves),
``retrieval.png`` (pass-key accuracy by context length and needle depth, one map per
variant), ``summary.json`` and one run directory per variant.

Variants: ``full`` (dense attention), ``nsa``, ``no_compressed``, ``no_selected``,
``no_window`` (a branch left out of Eq. 5; selection still uses the compression
scores), ``mean_pool`` (mean pooling instead of the compression MLP), and any
``FIELD=VALUE`` override of ``NSAConfig`` (``num_selected=8``,
``selection_block_size=32``, ``window=128``...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np

from experiments import evaluate, train

NAMED_VARIANTS = {
    "nsa": {},
    "no_compressed": {"branches": ("selected", "window")},
    "no_selected": {"branches": ("compressed", "window")},
    "no_window": {"branches": ("compressed", "selected")},
    "mean_pool": {"compression": "mean"},
}


def variant_config(base: train.TrainConfig, variant: str) -> train.TrainConfig:
    """The training config of one variant of ``base``.

    Raises:
      ValueError: unknown variant name or ``NSAConfig`` field, or a value of the wrong kind.
    """
    model = base.model
    if variant == "full":
        return dataclasses.replace(base, model=dataclasses.replace(model, attention="full"))
    if variant in NAMED_VARIANTS:
        changes = NAMED_VARIANTS[variant]
    elif "=" in variant:
        field, value = variant.split("=", 1)
        fields = {f.name: f for f in dataclasses.fields(model.nsa)}
        if field not in fields:
            raise ValueError(f"variant {variant!r}: {field!r} is not an NSAConfig field")
        current = getattr(model.nsa, field)
        try:
            changes = {field: type(current)(value)}
        except (TypeError, ValueError) as err:
            raise ValueError(f"variant {variant!r}: {value!r} is not a {type(current).__name__}") from err
    else:
        known = ["full", *NAMED_VARIANTS]
        raise ValueError(f"variant must be one of {known} or FIELD=VALUE, got {variant!r}")
    nsa = dataclasses.replace(model.nsa, **changes)
    return dataclasses.replace(base, model=dataclasses.replace(model, attention="nsa", nsa=nsa))


def _plot_losses(summaries: dict[str, dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, summary in summaries.items():
        losses = np.asarray(summary["losses"])
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=name)
    ax.set(xlabel="step", ylabel="training loss (nats / scored byte)", title="ablation: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(summaries: dict[str, dict], config: train.TrainConfig, command: str) -> str:
    """The Markdown report of an ablation."""
    device = jax.devices()[0].device_kind
    lines = [
        f"# Ablation ({device}, {jax.device_count()} device(s), jax {jax.__version__})",
        "",
        f"Command: `{command}`",
        "",
        f"Same model size (layers={config.model.num_layers}, width={config.model.model_dim}), data "
        f"(byte-level stdlib text, {config.task_fraction:.0%} pass-key rows), context {config.seq_len}, "
        f"{config.steps} steps, batch {config.batch_size}, seed {config.seed}.",
        "",
        "| variant | final train loss | held-out bits/byte | pass-key accuracy (mean) | tokens/s "
        "| peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        peaks = s["peak_memory_bytes_per_device"]
        memory = "-" if peaks is None else f"{max(peaks) / 2**30:.2f} GiB"
        lines.append(
            f"| {name} | {s['final_loss']:.3f} | {s['eval_bits_per_byte']:.3f} | "
            f"{np.mean(s['retrieval_accuracy']):.2f} | {s['tokens_per_s']:.0f} | {memory} |"
        )
    lines += ["", "![loss](loss.png)", "", "![retrieval](retrieval.png)", ""]
    return "\n".join(lines)


def ablate(
    base: train.TrainConfig,
    variants: Sequence[str],
    out_dir: pathlib.Path,
    *,
    command: str,
    progress: bool = True,
) -> dict[str, dict]:
    """Runs every variant; returns their summaries and writes the report."""
    configs = {name: variant_config(base, name) for name in variants}  # all errors before any training
    summaries = {}
    for name, config in configs.items():
        summaries[name] = train.train(config, out_dir / name.replace("=", "_"), progress=progress)
        brief = {k: v for k, v in summaries[name].items() if k != "losses"}
        print(json.dumps({"variant": name, **brief}), flush=True)
    grids = {name: np.asarray(s["retrieval_accuracy"]) for name, s in summaries.items()}
    evaluate.plot_heatmaps(grids, base.eval_lengths, base.eval_depths, out_dir / "retrieval.png")
    _plot_losses(summaries, out_dir / "loss.png")
    (out_dir / "report.md").write_text(report(summaries, base, command))
    (out_dir / "summary.json").write_text(json.dumps(summaries, indent=2))
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(train.PRESETS), default="cpu")
    parser.add_argument("--variants", nargs="+", default=["full", "nsa", "no_compressed", "no_window"])
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--seq-len", type=int, help="override the preset's context length")
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--eval-lengths", type=int, nargs="+", help="context lengths of the retrieval map")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/ablate"))
    args = parser.parse_args(argv)
    base = train.PRESETS[args.preset]()
    if args.steps is not None:
        base = dataclasses.replace(base, steps=args.steps)
    if args.seq_len is not None:
        base = dataclasses.replace(base, seq_len=args.seq_len)
    if args.layers is not None:
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, num_layers=args.layers))
    if args.eval_lengths is not None:
        base = dataclasses.replace(base, eval_lengths=tuple(args.eval_lengths))
    command = "python -m experiments.ablate " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ablate(base, args.variants, args.out, command=command)
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
