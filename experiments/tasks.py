"""Synthetic long-context tasks on bytes, generated on the fly (grain).

- Pass-key retrieval: filler text with ``" The pass key is NNNNN. Remember it."``
  inserted at a chosen depth; the sequence ends with ``" What is the pass key? The
  pass key is "`` and the five digits, which are the only scored targets.
- Multi-query associative recall (MQAR): ``num_pairs`` random key-value byte pairs
  ``"k=v;"``, then queries ``"k?v"`` for some keys; the values after ``?`` are scored.

Every example is ``{"tokens": int32 [L + 1], "mask": float32 [L]}``: ``mask[i]`` says
whether predicting ``tokens[i + 1]`` from ``tokens[: i + 1]`` is scored.
"""

from __future__ import annotations

import grain
import numpy as np

PASSKEY_DIGITS = 5
_NEEDLE = b" The pass key is %s. Remember it. "
_QUESTION = b" What is the pass key? The pass key is "


def passkey_min_length() -> int:
    """The shortest ``length`` a pass-key example fits in (needle and question, no filler)."""
    return len(_NEEDLE % (b"0" * PASSKEY_DIGITS)) + len(_QUESTION) + PASSKEY_DIGITS - 1


def passkey_example(rng: np.random.Generator, filler: np.ndarray, length: int, depth: float) -> dict:
    """One pass-key example of ``length + 1`` bytes, the needle at fraction ``depth`` of the filler.

    Raises:
      ValueError: ``length`` too short for needle and question, or ``depth`` outside [0, 1].
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    key = "".join(str(d) for d in rng.integers(0, 10, PASSKEY_DIGITS)).encode()
    needle = np.frombuffer(_NEEDLE % key, np.uint8)
    tail = np.frombuffer(_QUESTION + key, np.uint8)
    filler_len = length + 1 - len(needle) - len(tail)
    if filler_len < 0:
        raise ValueError(f"length must be at least {passkey_min_length()} for a pass-key example")
    start = int(rng.integers(0, max(1, len(filler) - filler_len)))
    text = filler[start : start + filler_len]
    at = round(depth * filler_len)
    tokens = np.concatenate([text[:at], needle, text[at:], tail]).astype(np.int32)
    mask = np.zeros(length, np.float32)
    mask[length - PASSKEY_DIGITS :] = 1.0
    return {"tokens": tokens, "mask": mask}


def mqar_example(rng: np.random.Generator, length: int, num_pairs: int, num_queries: int) -> dict:
    """One MQAR example: ``num_pairs`` pairs ``k=v;``, then ``num_queries`` queries ``k?v``.

    Keys are distinct lowercase letters and digits (at most 36); values are uppercase
    letters. The rest of the sequence is spaces (unscored).
    """
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8)
    if not 1 <= num_pairs <= len(alphabet):
        raise ValueError(f"num_pairs must lie in [1, {len(alphabet)}], got {num_pairs}")
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_queries must lie in [1, num_pairs={num_pairs}], got {num_queries}")
    if 4 * num_pairs + 3 * num_queries > length + 1:
        raise ValueError(f"length {length} is too short for {num_pairs} pairs and {num_queries} queries")
    keys = rng.permutation(alphabet)[:num_pairs]
    values = rng.integers(ord("A"), ord("Z") + 1, num_pairs).astype(np.uint8)
    context = np.stack([keys, np.full(num_pairs, ord("=")), values, np.full(num_pairs, ord(";"))], 1).ravel()
    asked = rng.permutation(num_pairs)[:num_queries]
    queries = np.stack([keys[asked], np.full(num_queries, ord("?")), values[asked]], 1).ravel()
    pad = np.full(length + 1 - len(context) - len(queries), ord(" "), np.uint8)
    tokens = np.concatenate([context, pad, queries]).astype(np.int32)
    mask = np.zeros(length, np.float32)
    answer_positions = len(context) + len(pad) + 3 * np.arange(num_queries) + 2
    mask[answer_positions - 1] = 1.0
    return {"tokens": tokens, "mask": mask}


def task_batches(
    kind: str,
    *,
    filler: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    mqar_pairs: int = 16,
) -> grain.DatasetIterator:
    """Endless batches of one task, deterministic in ``seed``; ``start_step`` resumes.

    ``kind``: ``"passkey"`` (depth uniform in [0, 1]) or ``"mqar"``.
    """
    if kind not in ("passkey", "mqar"):
        raise ValueError(f"kind must be 'passkey' or 'mqar', got {kind!r}")

    def example(index: int) -> dict:
        rng = np.random.default_rng([seed, index])
        if kind == "passkey":
            return passkey_example(rng, filler, seq_len, float(rng.uniform()))
        return mqar_example(rng, seq_len, mqar_pairs, mqar_pairs // 2)

    dataset = grain.MapDataset.range(start_step * batch_size, 2**62).map(example).batch(batch_size)
    return iter(dataset.to_iter_dataset())
