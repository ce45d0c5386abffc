"""Train the byte LM: ``python -m experiments.train --preset cpu``.

Runs ``jax.jit`` over a ``Mesh`` with axes ``(data, fsdp, tensor)``: parameters are
placed by their logical axis names (``nsa_jax.sharding``), batches split over
``data`` and ``fsdp``. AdamW with warmup and cosine decay, global-norm clipping,
gradient accumulation, compute in ``NSAConfig.dtype`` with float32 parameters, orbax
checkpoints with exact resume (the data stream is a pure function of the step).

Writes into ``--out``: ``metrics.jsonl`` (one line per step), ``summary.json``,
``loss.png``, ``retrieval.png`` and ``checkpoints/``.
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
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from experiments import data, evaluate, tasks
from experiments.model import ModelConfig, TransformerLM
from nsa_jax import NSAConfig
from nsa_jax.sharding import parameter_shardings

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
      mesh: sizes of the ``(data, fsdp, tensor)`` axes; ``None`` uses every device for
        ``data``.
      grad_accum: micro-batches per step (``batch_size`` must be divisible by it).
      task_fraction: share of each batch that is pass-key retrieval (the rest is text).
      eval_lengths, eval_depths: the retrieval heat map's grid.
    """

    model: ModelConfig
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    grad_accum: int = 1
    mesh: tuple[int, int, int] | None = None
    task_fraction: float = 0.25
    eval_every: int = 50
    eval_batches: int = 4
    eval_lengths: tuple[int, ...] = (128, 256)
    eval_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    eval_examples: int = 8
    checkpoint_every: int = 100
    corpus_bytes: int | None = 4_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "grad_accum", "checkpoint_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be divisible by "
                f"grad_accum ({self.grad_accum})"
            )
        if not 0.0 <= self.task_fraction <= 1.0:
            raise ValueError(f"TrainConfig.task_fraction must lie in [0, 1], got {self.task_fraction}")
        shortest = tasks.passkey_min_length()
        if self.task_fraction > 0 and self.seq_len < shortest:
            raise ValueError(f"TrainConfig.seq_len must be at least {shortest} for pass-key examples")
        if min(self.eval_lengths) < shortest:
            raise ValueError(f"TrainConfig.eval_lengths must all be at least {shortest}")


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


def _accelerator_preset() -> TrainConfig:
    nsa = NSAConfig(
        model_dim=512,
        num_heads=16,
        num_kv_heads=1,
        head_dim_qk=64,
        head_dim_v=64,
        window=512,
        dtype=jnp.bfloat16,
    )
    return TrainConfig(
        model=ModelConfig(model_dim=512, mlp_dim=1376, num_layers=4, nsa=nsa),
        seq_len=8192,
        batch_size=8,
        steps=1000,
        learning_rate=1e-3,
        warmup_steps=100,
        corpus_bytes=None,
        eval_lengths=(1024, 2048, 4096, 8192),
        eval_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
        eval_examples=16,
        checkpoint_every=250,
    )


PRESETS = {"cpu": _cpu_preset, "gpu": _accelerator_preset, "tpu": _accelerator_preset}


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, gradients clipped by global norm."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1)
    )
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm), optax.adamw(schedule, weight_decay=config.weight_decay)
    )


def make_mesh(shape: tuple[int, int, int] | None) -> jax.sharding.Mesh:
    """A mesh with axes ``(data, fsdp, tensor)`` over the first ``prod(shape)`` devices;
    ``None`` puts every device on ``data``."""
    shape = shape or (jax.device_count(), 1, 1)
    if math.prod(shape) > jax.device_count():
        raise ValueError(f"mesh {shape} needs {math.prod(shape)} devices, {jax.device_count()} are present")
    # Auto axes: XLA propagates shardings from the placed parameters and batches.
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=jax.devices()[: math.prod(shape)],
    )


def masked_loss(
    model: TransformerLM, tokens: jax.Array, mask: jax.Array, scored: jax.Array | None = None
) -> jax.Array:
    """Cross-entropy (nats) summed over scored next-byte predictions, divided by ``scored``.

    ``tokens [B, L+1]``, ``mask [B, L]``; ``scored`` defaults to ``mask.sum()`` (the
    mean). Micro-batches pass the whole batch's count, so their sum is the mean.
    """
    logits = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    scored = jnp.sum(mask) if scored is None else scored
    return jnp.sum(losses * mask) / jnp.maximum(scored, 1.0)


class Trainer:
    """Model, optimizer and the compiled sharded step of one run."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.mesh = make_mesh(config.mesh)
        model = TransformerLM(config.model, rngs=nnx.Rngs(config.seed))
        optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
        self.graphdef, state = nnx.split((model, optimizer))
        self.state_shardings = parameter_shardings(state, self.mesh)
        self.state = jax.device_put(state, self.state_shardings)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp"), None))
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self._logits = jax.jit(lambda state, tokens: nnx.merge(self.graphdef, state)[0](tokens))

    def _train_step(self, state, tokens, mask):
        model, optimizer = nnx.merge(self.graphdef, state)
        micro = self.config.grad_accum
        tokens = tokens.reshape(micro, -1, tokens.shape[-1])
        mask = mask.reshape(micro, -1, mask.shape[-1])
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        scored = jnp.sum(mask)

        def loss_of(params, tokens, mask):
            return masked_loss(nnx.merge(graph, params, rest), tokens, mask, scored)

        def accumulate(carry, batch):
            loss, grads = jax.value_and_grad(loss_of)(params, *batch)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (tokens, mask))
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    # Under the mesh the layer runs attention per shard (nsa_jax.sharding.sharded_ops).
    def step(self, tokens: np.ndarray, mask: np.ndarray) -> float:
        with jax.set_mesh(self.mesh):
            self.state, loss = self._step(self.state, tokens, mask)
        return float(loss)

    def logits(self, tokens: jax.Array) -> jax.Array:
        with jax.set_mesh(self.mesh):
            return self._logits(self.state, tokens)

    def checkpoint_manager(self, directory: pathlib.Path) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        )

    def save(self, manager: ocp.CheckpointManager, step: int) -> None:
        manager.save(step, args=ocp.args.StandardSave(nnx.to_pure_dict(self.state)))
        manager.wait_until_finished()

    def restore(self, manager: ocp.CheckpointManager) -> int:
        """Restores the latest checkpoint; returns its step (0 when there is none)."""
        latest = manager.latest_step()
        if latest is None:
            return 0
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nnx.to_pure_dict(self.state),
            nnx.to_pure_dict(self.state_shardings),
        )
        restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
        nnx.replace_by_pure_dict(self.state, restored)
        return latest


def _batches(config: TrainConfig, corpus: np.ndarray, start_step: int):
    """Endless ``(tokens [B, L+1], mask [B, L])`` batches mixing text and pass-key examples."""
    task_rows = round(config.batch_size * config.task_fraction)
    text_rows = config.batch_size - task_rows
    text = (
        data.window_batches(
            corpus, seq_len=config.seq_len, batch_size=text_rows, seed=config.seed, start_step=start_step
        )
        if text_rows
        else None
    )
    task = (
        tasks.task_batches(
            "passkey",
            filler=corpus,
            seq_len=config.seq_len,
            batch_size=task_rows,
            seed=config.seed + 7,
            start_step=start_step,
        )
        if task_rows
        else None
    )
    while True:
        tokens, masks = [], []
        if text is not None:
            batch = next(text)["tokens"]
            tokens.append(batch)
            masks.append(np.ones((text_rows, config.seq_len), np.float32))
        if task is not None:
            batch = next(task)
            tokens.append(batch["tokens"])
            masks.append(batch["mask"])
        yield np.concatenate(tokens), np.concatenate(masks)


def _plot_loss(rows: list[dict], path: pathlib.Path, title: str) -> None:
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


def _peak_memory_bytes_per_device() -> list[int] | None:
    """Peak bytes in use on each local device, ``None`` where the backend keeps no statistics."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if not stats:
            return None
        peaks.append(int(stats.get("peak_bytes_in_use", 0)))
    return peaks


def train(
    config: TrainConfig,
    out_dir: pathlib.Path,
    *,
    progress: bool = True,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Trains (resuming from ``out_dir/checkpoints`` if ``resume``); returns the summary.

    ``stop_after`` ends the run early after that many steps (the schedule still
    follows ``config.steps``), to exercise checkpoint resume.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = data.load_bytes(data.default_corpus_path(), max_bytes=config.corpus_bytes)
    train_bytes, held_out = data.split(corpus)
    trainer = Trainer(config)
    manager = trainer.checkpoint_manager(out_dir / "checkpoints")
    start = trainer.restore(manager) if resume else 0
    eval_sets = [
        b["tokens"]
        for _, b in zip(
            range(config.eval_batches),
            data.window_batches(
                held_out, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed + 1
            ),
            strict=False,
        )
    ]
    batches = _batches(config, train_bytes, start)
    tokens_per_step = config.batch_size * config.seq_len
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    mode = "a" if resume and start else "w"
    rows = []
    with (out_dir / "metrics.jsonl").open(mode) as log:
        bar = tqdm(
            range(start, end),
            disable=not progress,
            desc=f"train {config.model.attention}",
            initial=start,
            total=end,
        )
        last = time.perf_counter()
        for step in bar:
            tokens, mask = next(batches)
            loss = trainer.step(tokens, mask)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}")
            now = time.perf_counter()
            row = {"step": step, "loss": loss, "tokens_per_s": tokens_per_step / (now - last)}
            last = now
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                row["eval_loss"] = evaluate.bits_per_byte(trainer.logits, eval_sets) * math.log(2)
                last = time.perf_counter()
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:
                trainer.save(manager, step + 1)
                last = time.perf_counter()
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    all_rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "attention": config.model.attention,
        "branches": list(config.model.nsa.branches),
        "steps": end,
        "first_loss": all_rows[0]["loss"],
        "final_loss": float(np.mean([r["loss"] for r in all_rows[-10:]])),
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in all_rows[len(all_rows) // 2 :]])),
        "peak_memory_bytes_per_device": _peak_memory_bytes_per_device(),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "losses": [r["loss"] for r in all_rows],
    }
    if end == config.steps:
        summary["eval_bits_per_byte"] = evaluate.bits_per_byte(trainer.logits, eval_sets)
        grid = evaluate.retrieval_accuracy(
            trainer.logits,
            held_out,
            lengths=config.eval_lengths,
            depths=config.eval_depths,
            examples=config.eval_examples,
            seed=config.seed + 2,
        )
        summary["retrieval_accuracy"] = grid.tolist()
        evaluate.plot_heatmaps(
            {config.model.attention: grid}, config.eval_lengths, config.eval_depths, out_dir / "retrieval.png"
        )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot_loss(all_rows, out_dir / "loss.png", f"byte LM, {config.model.attention} attention")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--attention", choices=["nsa", "full"], default="nsa")
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--batch-size", type=int, help="override the preset's global batch size")
    parser.add_argument(
        "--mesh", type=int, nargs=3, metavar=("DATA", "FSDP", "TENSOR"), help="mesh axis sizes"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/train"))
    args = parser.parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    config = PRESETS[args.preset]()
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention=args.attention))
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    if args.batch_size is not None:
        config = dataclasses.replace(config, batch_size=args.batch_size)
    if args.mesh is not None:
        config = dataclasses.replace(config, mesh=tuple(args.mesh))
    summary = train(config, args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))


if __name__ == "__main__":
    main()
