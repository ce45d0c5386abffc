"""Inputs shared by the selected-attention GPU check and benchmark."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.segments import segment_starts


def random_causal_indices(
    key: jax.Array,
    batch: int,
    length: int,
    kv_heads: int,
    slots: int,
    block_size: int,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Random distinct visible blocks per (query, KV head), the query's own block included.

    Block ``j`` is visible to query ``t`` when ``s0 + j * block_size <= t``. Each row
    holds the own block plus ``slots - 1`` distinct random earlier blocks, sorted
    ascending, ``-1`` last when fewer blocks are visible.

    Returns:
      int32 ``[B, T, H, n]``.
    """
    num_blocks = -(-length // block_size)
    s0 = segment_starts(segment_ids, batch, length)
    own = (jnp.arange(length, dtype=jnp.int32)[None, :] - s0) // block_size  # [B, T]
    scores = jax.random.uniform(key, (batch, length, kv_heads, num_blocks))
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    earlier = blocks[None, None, None, :] < own[:, :, None, None]
    scores = jnp.where(earlier, scores, -1.0)
    top, picked = jax.lax.top_k(scores, min(slots - 1, num_blocks))
    picked = jnp.where(top >= 0, picked, -1).astype(jnp.int32)
    if picked.shape[-1] < slots - 1:
        padding = jnp.full((*picked.shape[:-1], slots - 1 - picked.shape[-1]), -1, jnp.int32)
        picked = jnp.concatenate([picked, padding], axis=-1)
    own = jnp.broadcast_to(own[:, :, None, None], (batch, length, kv_heads, 1))
    chosen = jnp.concatenate([picked, own], axis=-1)
    ordered = jnp.sort(jnp.where(chosen < 0, num_blocks, chosen), axis=-1)
    return jnp.where(ordered == num_blocks, -1, ordered)


def packed_segments(batch: int, length: int, cuts: tuple[int, ...]) -> jax.Array:
    """int32 ``[B, T]`` segment ids that change at each position in ``cuts``."""
    positions = jnp.arange(length)
    ids = jnp.sum(positions[:, None] >= jnp.asarray(cuts)[None, :], axis=1).astype(jnp.int32)
    return jnp.broadcast_to(ids, (batch, length))
