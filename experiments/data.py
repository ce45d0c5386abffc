"""Byte-level text data through grain.

The default corpus is the Python standard library source of the running
interpreter: real text that every machine has. Any file or directory can replace it.
"""

from __future__ import annotations

import pathlib
import sysconfig

import grain
import numpy as np


def default_corpus_path() -> pathlib.Path:
    """The standard library directory of the running interpreter."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def load_bytes(path: str | pathlib.Path, *, max_bytes: int | None = None) -> np.ndarray:
    """uint8 ``[N]``: a file's bytes, or a directory's ``*.py`` files concatenated in sorted order.

    Raises:
      ValueError: ``path`` does not exist or holds no text.
    """
    path = pathlib.Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.py") if p.is_file())
    else:
        raise ValueError(f"path must be an existing file or directory, got {str(path)!r}")
    chunks, total = [], 0
    for file in files:
        data = file.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    corpus = np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)
    if corpus.size < 2:
        raise ValueError(f"path holds no text: {str(path)!r}")
    return corpus


def split(corpus: np.ndarray, held_out_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out parts: the last ``held_out_fraction`` of the bytes is held out."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
    cut = int(len(corpus) * (1.0 - held_out_fraction))
    return corpus[:cut], corpus[cut:]


def window_batches(
    corpus: np.ndarray, *, seq_len: int, batch_size: int, seed: int, start_step: int = 0
) -> grain.DatasetIterator:
    """Endless batches of random windows, ``{"tokens": int32 [batch_size, seq_len + 1]}``.

    Deterministic in ``seed``; ``start_step`` skips batches already consumed (resume).
    """
    if len(corpus) <= seq_len + 1:
        raise ValueError(f"corpus of {len(corpus)} bytes is too short for seq_len={seq_len}")
    num_windows = len(corpus) - seq_len - 1

    def window(index: int) -> dict[str, np.ndarray]:
        start = int(np.random.default_rng([seed, index]).integers(num_windows))
        return {"tokens": corpus[start : start + seq_len + 1].astype(np.int32)}

    dataset = grain.MapDataset.range(start_step * batch_size, 2**62).map(window).batch(batch_size)
    return iter(dataset.to_iter_dataset())
