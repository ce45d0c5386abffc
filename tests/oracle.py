"""Dense masked-attention oracle, built independently from the spec's visibility rules.

Masks are written with plain Python loops over positions (no code shared with the
library); attention is one dense float32 softmax at full matmul precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def segments_of(segment_ids: np.ndarray | None, batch: int, length: int) -> list[list[tuple[int, int]]]:
    """Per row, the list of ``(start, end)`` of its segments (maximal equal runs)."""
    rows = []
    for b in range(batch):
        ids = np.zeros(length, int) if segment_ids is None else np.asarray(segment_ids[b])
        bounds, start = [], 0
        for t in range(1, length + 1):
            if t == length or ids[t] != ids[t - 1]:
                bounds.append((start, t))
                start = t
        rows.append(bounds)
    return rows


def segment_start_of(bounds: list[tuple[int, int]], t: int) -> int:
    return next(s0 for s0, s1 in bounds if s0 <= t < s1)


def selected_mask(block_indices: np.ndarray, block_size: int, segment_ids=None) -> np.ndarray:
    """bool ``[B, T, H, T]``: key s is one of query t's selected keys."""
    batch, length, heads, _ = block_indices.shape
    rows = segments_of(segment_ids, batch, length)
    mask = np.zeros((batch, length, heads, length), bool)
    for b in range(batch):
        for t in range(length):
            s0 = segment_start_of(rows[b], t)
            for h in range(heads):
                for j in block_indices[b, t, h]:
                    if j < 0:
                        continue
                    for s in range(s0 + j * block_size, s0 + (j + 1) * block_size):
                        if s <= t:
                            mask[b, t, h, s] = True
    return mask


def window_mask(batch: int, length: int, heads: int, window: int, segment_ids=None) -> np.ndarray:
    rows = segments_of(segment_ids, batch, length)
    mask = np.zeros((batch, length, heads, length), bool)
    for b in range(batch):
        for t in range(length):
            s0 = segment_start_of(rows[b], t)
            for s in range(max(s0, t - window + 1), t + 1):
                mask[b, t, :, s] = True
    return mask


def causal_mask(batch: int, length: int, heads: int, segment_ids=None) -> np.ndarray:
    return window_mask(batch, length, heads, length, segment_ids)


def compressed_slots(batch: int, length: int, block_length: int, block_stride: int, segment_ids=None):
    """Per row, ``{slot: (first raw position, segment start)}`` of each compressed token."""
    rows = []
    for bounds in segments_of(segment_ids, batch, length):
        slots = {}
        for s0, s1 in bounds:
            i = 0
            while s0 + i * block_stride + block_length <= s1:
                slots[-(-s0 // block_stride) + i] = (s0 + i * block_stride, s0)
                i += 1
        rows.append(slots)
    return rows


def compressed_mask(
    length: int,
    num_slots: int,
    heads: int,
    block_length: int,
    block_stride: int,
    batch: int,
    segment_ids=None,
) -> np.ndarray:
    """bool ``[B, T, H, Tc]``: compressed slot c is visible to query t."""
    rows = segments_of(segment_ids, batch, length)
    slots = compressed_slots(batch, length, block_length, block_stride, segment_ids)
    mask = np.zeros((batch, length, heads, num_slots), bool)
    for b in range(batch):
        for t in range(length):
            s0 = segment_start_of(rows[b], t)
            for c, (first, seg_start) in slots[b].items():
                if c < num_slots and seg_start == s0 and first + block_length - 1 <= t:
                    mask[b, t, :, c] = True
    return mask


def dense_attention(q, k, v, mask, scale=None):
    """float32 attention of ``q [B,T,HQ,Dk]`` on ``k [B,S,H,Dk]``, ``v [B,S,H,Dv]``.

    ``mask`` is bool ``[B, T, H, S]``; rows with nothing visible give 0.
    Returns ``(out [B,T,HQ,Dv], probs [B,T,HQ,S])``.
    """
    q_heads, kv_heads = q.shape[2], k.shape[2]
    group = q_heads // kv_heads
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    mask = jnp.repeat(jnp.asarray(mask), group, axis=2)
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bthd,bshd->bths", q.astype(jnp.float32), k, precision=hi) * scale
    logits = jnp.where(mask, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1) * mask
    probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bths,bshd->bthd", probs, v, precision=hi), probs


def relative_error(x, ref) -> float:
    """``norm(x - ref) / norm(ref)``; a reference of RMS below 1e-2 (a gradient that is
    exactly zero, say) is measured against RMS 1e-2 instead, so rounding noise passes."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    floor = 1e-2 * np.sqrt(max(ref.size, 1))
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))
