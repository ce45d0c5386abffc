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


def attend_selected(
    q: jax.Array,
    block_indices: jax.Array,
    query_starts: jax.Array,
    positions: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int,
    scale: float,
) -> jax.Array:
    """Attention of a chunk of queries over their selected blocks.

    Args:
      q: ``[B, C, HQ, Dk]``; block_indices: int ``[B, C, H, n]``.
      query_starts: int32 ``[B, C]`` segment starts; positions: int32 ``[B, C]``
        (or ``[1, C]``) query positions.
      k: ``[B, S, H, Dk]``; v: ``[B, S, H, Dv]``, the whole key sequence.

    Returns:
      ``[B, C, HQ, Dv]`` in ``q.dtype``.
    """
    batch, chunk, q_heads, _ = q.shape
    length, kv_heads = k.shape[1], k.shape[2]
    num_keys = block_indices.shape[-1] * block_size
    key_pos = selected_key_positions(block_indices, query_starts, block_size)
    visible = (
        (block_indices[..., None] >= 0) & (key_pos <= positions[:, :, None, None, None]) & (key_pos < length)
    )
    # [B, C, H, n, l'] -> [B, C * n * l', H, 1]: gather along the sequence axis in place.
    flat = jnp.clip(key_pos, 0, length - 1)
    flat = jnp.moveaxis(flat, 2, -1).reshape(batch, chunk * num_keys, kv_heads, 1)
    keys = jnp.take_along_axis(k, flat, axis=1).reshape(batch, chunk, num_keys, kv_heads, -1)
    values = jnp.take_along_axis(v, flat, axis=1).reshape(batch, chunk, num_keys, kv_heads, -1)
    queries = q.reshape(batch, chunk, kv_heads, q_heads // kv_heads, -1)
    logits = (
        jnp.einsum(
            "bchgd,bcshd->bchgs",
            queries,
            keys,
            preferred_element_type=accumulation_dtype(q.dtype),
            precision=PRECISION,
        )
        * scale
    )
    mask = visible.reshape(batch, chunk, kv_heads, 1, num_keys)
    probs, _ = masked_softmax(logits, mask)
    out = jnp.einsum("bchgs,bcshd->bchgd", probs, values.astype(probs.dtype), precision=PRECISION)
    return out.reshape(batch, chunk, q_heads, -1).astype(q.dtype)


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
    batch, length = q.shape[:2]
    starts = segment_starts(segment_ids, batch, length)

    def chunk_fn(_, positions, q_chunk, index_chunk, start_chunk):
        out = attend_selected(
            q_chunk, index_chunk, start_chunk, positions, k, v, block_size=block_size, scale=scale
        )
        return (out,)

    (out,) = map_query_chunks(chunk_fn, (q, block_indices, starts))
    return out
