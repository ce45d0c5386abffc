"""Evaluation: held-out bits per byte and pass-key retrieval accuracy by length and depth."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.tasks import PASSKEY_DIGITS, passkey_example

LogitsFn = Callable[[jax.Array], jax.Array]  # tokens [B, L] -> logits [B, L, V]


def bits_per_byte(logits_fn: LogitsFn, batches: Sequence[np.ndarray]) -> float:
    """Mean next-byte cross-entropy in bits over ``batches`` of ``tokens [B, L + 1]``."""
    nats = []
    for tokens in batches:
        logits = logits_fn(jnp.asarray(tokens[:, :-1]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        nats.append(-float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:])[..., None], -1))))
    return float(np.mean(nats)) / math.log(2)


def retrieval_accuracy(
    logits_fn: LogitsFn,
    filler: np.ndarray,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    examples: int,
    seed: int,
) -> np.ndarray:
    """Exact-match pass-key accuracy, ``[len(lengths), len(depths)]``.

    An example counts when the argmax prediction of every key digit is right given
    the digits before it (the same as greedy decoding of the key).
    """
    grid = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            rng = np.random.default_rng([seed, i, j])
            batch = [passkey_example(rng, filler, length, depth) for _ in range(examples)]
            tokens = np.stack([b["tokens"] for b in batch])
            logits = logits_fn(jnp.asarray(tokens[:, :-1]))
            predicted = np.asarray(jnp.argmax(logits[:, -PASSKEY_DIGITS:], axis=-1))
            grid[i, j] = float(np.mean(np.all(predicted == tokens[:, -PASSKEY_DIGITS:], axis=1)))
    return grid


def plot_heatmaps(
    grids: dict[str, np.ndarray], lengths: Sequence[int], depths: Sequence[float], path
) -> None:
    """One retrieval heat map per variant (rows: context length, columns: needle depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.0), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set(title=name, xlabel="needle depth", ylabel="context length")
        ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
