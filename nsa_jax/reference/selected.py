"""Selected-block attention by gather (spec, "Selected attention (Eq. 12)")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.reference.common import PRECISION, accumulation_dtype, map_query_chunks, masked_softmax
from nsa_jax.segments import segment_starts


def selected_key_positions(block_indices: jax.Array, starts: jax.Array, block_size: int) -> jax.Array:
    """Raw key position of every selected key.

    Args:
      block_indices: int ``[B, C, H, n]``, block numbers counted from each query's
        segment start; ``-1`` marks an unused slot.
      starts: int32 ``[B, C]``, segment start of each query.

    Returns:
      int32 ``[B, C, H, n, block_size]``; meaningless where the slot is ``-1``.
    """
    offsets = jnp.arange(block_size, dtype=jnp.int32)
    first = starts[:, :, None, None] + block_indices.astype(jnp.int32) * block_size
    return first[..., None] + offsets


def selected_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    *,
    block_size: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Reference selected attention; arguments as :func:`nsa_jax.selected_attention`.

    Gathers the ``n * block_size`` selected keys of every query, chunk by chunk of
    ``QUERY_CHUNK_SIZE`` queries, and computes float32 masked attention on them.
    """
    batch, length, q_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    num_slots = block_indices.shape[-1]
    k_by_head = jnp.swapaxes(k, 1, 2)
    v_by_head = jnp.swapaxes(v, 1, 2)
    starts = segment_starts(segment_ids, batch, length)

    def chunk_fn(_, positions, q_chunk, index_chunk, start_chunk):
        chunk = q_chunk.shape[1]
        key_pos = selected_key_positions(index_chunk, start_chunk, block_size)
        visible = (
            (index_chunk[..., None] >= 0)
            & (key_pos <= positions[None, :, None, None, None])
            & (key_pos < length)
        )
        flat = jnp.clip(key_pos, 0, length - 1)
        flat = jnp.swapaxes(flat, 1, 2).reshape(batch, kv_heads, chunk * num_slots * block_size)
        keys = jnp.take_along_axis(k_by_head, flat[..., None], axis=2)
        values = jnp.take_along_axis(v_by_head, flat[..., None], axis=2)
        keys = keys.reshape(batch, kv_heads, chunk, num_slots * block_size, -1)
        values = values.reshape(batch, kv_heads, chunk, num_slots * block_size, -1)
        queries = q_chunk.reshape(batch, chunk, kv_heads, group, -1)
        logits = (
            jnp.einsum(
                "bchgd,bhcsd->bchgs",
                queries,
                keys,
                preferred_element_type=accumulation_dtype(q.dtype),
                precision=PRECISION,
            )
            * scale
        )
        mask = visible.reshape(batch, chunk, kv_heads, 1, num_slots * block_size)
        probs, _ = masked_softmax(logits, mask)
        out = jnp.einsum("bchgs,bhcsd->bchgd", probs, values.astype(probs.dtype), precision=PRECISION)
        return (out.reshape(batch, chunk, q_heads, -1).astype(q.dtype),)

    (out,) = map_query_chunks(chunk_fn, (q, block_indices, starts))
    return out
