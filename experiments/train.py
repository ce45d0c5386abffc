"""Train the byte LM: ``python -m experiments.train --preset cpu``.

Writes ``metrics.jsonl`` (one line per logged step), ``summary.json`` and a loss
curve ``loss.png`` into the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from experiments import data
from experiments.model import ModelConfig, TransformerLM, next_token_loss
from nsa_jax import NSAConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    model: ModelConfig
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    corpus_bytes: int | None = 4_000_000
    seed: int = 0


def _cpu_preset() -> TrainConfig:
    nsa = NSAConfig(
        model_dim=64,
        num_heads=4,
        num_kv_heads=1,
        head_dim_qk=16,
        head_dim_v=16,
        block_length=16,
        block_stride=8,
        selection_block_size=32,
        num_selected=4,
        window=64,
    )
    return TrainConfig(
        model=ModelConfig(model_dim=64, mlp_dim=172, num_layers=2, nsa=nsa),
        seq_len=256,
        batch_size=8,
        steps=300,
    )


def _gpu_preset() -> TrainConfig:
    nsa = NSAConfig(
        model_dim=512,
        num_heads=8,
        num_kv_heads=2,
        head_dim_qk=64,
        head_dim_v=64,
        dtype=jnp.bfloat16,
    )
    return TrainConfig(
        model=ModelConfig(model_dim=512, mlp_dim=1376, num_layers=6, nsa=nsa),
        seq_len=8192,
        batch_size=4,
        steps=2000,
        learning_rate=1e-3,
        warmup_steps=100,
        corpus_bytes=None,
    )


PRESETS = {"cpu": _cpu_preset, "gpu": _gpu_preset}


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, gradients clipped by global norm."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1)
    )
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm), optax.adamw(schedule, weight_decay=config.weight_decay)
    )


def _plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held out")
    ax.set(xlabel="step", ylabel="loss (nats / byte)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(config: TrainConfig, out_dir: pathlib.Path, *, progress: bool = True) -> dict:
    """Trains from scratch; returns the summary also written to ``out_dir/summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = data.load_bytes(data.default_corpus_path(), max_bytes=config.corpus_bytes)
    train_bytes, held_out = data.split(corpus)
    batches = data.window_batches(
        train_bytes, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed
    )
    eval_batches = [
        b["tokens"]
        for _, b in zip(
            range(config.eval_batches),
            data.window_batches(
                held_out, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed + 1
            ),
            strict=False,
        )
    ]
    model = TransformerLM(config.model, rngs=nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def eval_step(model, tokens):
        return next_token_loss(model, tokens)

    rows = []
    tokens_per_step = config.batch_size * config.seq_len
    bar = tqdm(range(config.steps), disable=not progress, desc=f"train {config.model.attention}")
    with (out_dir / "metrics.jsonl").open("w") as log:
        start = time.perf_counter()
        for step in bar:
            tokens = jnp.asarray(next(batches)["tokens"])
            loss = float(train_step(model, optimizer, tokens))
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}")
            elapsed = time.perf_counter() - start
            row = {"step": step, "loss": loss, "tokens_per_s": tokens_per_step * (step + 1) / elapsed}
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                row["eval_loss"] = float(
                    np.mean([float(eval_step(model, jnp.asarray(b))) for b in eval_batches])
                )
                row["eval_bits_per_byte"] = row["eval_loss"] / math.log(2)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    summary = {
        "attention": config.model.attention,
        "steps": config.steps,
        "first_loss": rows[0]["loss"],
        "final_loss": float(np.mean([r["loss"] for r in rows[-10:]])),
        "final_eval_bits_per_byte": rows[-1]["eval_bits_per_byte"],
        "tokens_per_s": rows[-1]["tokens_per_s"],
        "backend": jax.default_backend(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(rows, out_dir / "loss.png", f"byte LM, {config.model.attention} attention")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--attention", choices=["nsa", "full"], default="nsa")
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/train"))
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]()
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention=args.attention))
    if args.steps is not None:
        if args.steps <= 0:
            parser.error(f"--steps must be positive, got {args.steps}")
        config = dataclasses.replace(config, steps=args.steps)
    summary = train(config, args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
