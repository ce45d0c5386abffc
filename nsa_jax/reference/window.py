"""Sliding-window attention (spec, "Sliding window")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.reference.common import (
    PRECISION,
    QUERY_CHUNK_SIZE,
    accumulation_dtype,
    map_query_chunks,
    masked_softmax,
)
from nsa_jax.segments import segment_starts


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Reference window attention; arguments as :func:`nsa_jax.sliding_window_attention`.

    Each chunk of ``C`` queries reads one contiguous slab of ``C + w - 1`` keys, so
    memory is ``O(T * (C + w))`` rather than ``O(T^2)``.
    """
    batch, length, q_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    window = min(window, length)
    chunk = min(QUERY_CHUNK_SIZE, length)
    slab = chunk + window - 1
    padded_length = -(-length // chunk) * chunk
    # Front padding puts key position p at index p + window - 1 of the padded arrays.
    pad = [(0, 0), (window - 1, padded_length - length), (0, 0), (0, 0)]
    k_padded = jnp.pad(k, pad)
    v_padded = jnp.pad(v, pad)
    starts = segment_starts(segment_ids, batch, length)

    def chunk_fn(chunk_start, positions, q_chunk, start_chunk):
        keys = jax.lax.dynamic_slice_in_dim(k_padded, chunk_start, slab, axis=1)
        values = jax.lax.dynamic_slice_in_dim(v_padded, chunk_start, slab, axis=1)
        key_pos = chunk_start - window + 1 + jnp.arange(slab, dtype=jnp.int32)
        query_pos = positions[:, :, None]
        visible = (key_pos[None, None, :] >= jnp.maximum(query_pos - window + 1, start_chunk[:, :, None])) & (
            key_pos[None, None, :] <= query_pos
        )
        queries = q_chunk.reshape(batch, chunk, kv_heads, group, -1)
        logits = (
            jnp.einsum(
                "bchgd,bshd->bchgs",
                queries,
                keys,
                preferred_element_type=accumulation_dtype(q.dtype),
                precision=PRECISION,
            )
            * scale
        )
        probs, _ = masked_softmax(logits, visible[:, :, None, None, :])
        out = jnp.einsum("bchgs,bshd->bchgd", probs, values.astype(probs.dtype), precision=PRECISION)
        return (out.reshape(batch, chunk, q_heads, -1).astype(q.dtype),)

    (out,) = map_query_chunks(chunk_fn, (q, starts), chunk_size=chunk)
    return out
