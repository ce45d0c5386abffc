"""Block selection from compression scores (spec, "Selection scores (Eqs. 8-10)").

Block numbers are counted from the start of each query's segment (spec, packing):
selection block ``j`` of a query whose segment starts at ``s0`` covers raw keys
``[s0 + j*l', s0 + (j+1)*l')``. ``block_indices`` are sorted ascending, unused slots
(``-1``) last.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.reference.common import map_query_chunks
from nsa_jax.reference.compressed import compression_probabilities
from nsa_jax.segments import compressed_token_starts, segment_starts


@functools.cache
def overlap_weights(
    block_length: int, block_stride: int, selection_block_size: int
) -> tuple[int, tuple[int, ...]]:
    """Eq. 9 as a function of (l, d, l'): compressed tokens feeding one selection block.

    Compressed token ``i`` covers ``[i*d, i*d + l)``; selection block ``j`` covers
    ``[j*l', (j+1)*l')``. The weight of ``i`` in block ``j`` is their token overlap
    divided by ``d`` (the number of (m, n) pairs of Eq. 9 that hit it); it depends
    only on ``i - j*l'/d``.

    Returns:
      ``(first, weights)``: block ``j`` collects compressed tokens
      ``j*l'/d + first + k`` with weight ``weights[k]``. For (32, 16, 64) this is
      ``(-1, (1, 2, 2, 2, 1))``.
    """
    l, d, lsel = block_length, block_stride, selection_block_size
    first = -(l // d) + 1
    weights = []
    for offset in range(first, lsel // d):
        start = offset * d
        overlap = min(start + l, lsel) - max(start, 0)
        weights.append(overlap // d)
    return first, tuple(weights)


def block_importance(
    probs: jax.Array,
    query_starts: jax.Array,
    *,
    num_kv_heads: int,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_blocks: int,
) -> jax.Array:
    """Importance of each selection block (Eq. 9, then the GQA group sum of Eq. 10).

    Args:
      probs: float32 ``[B, C, HQ, Tc]`` compression probabilities (slot layout of
        :mod:`nsa_jax.segments`).
      query_starts: int32 ``[B, C]`` segment start of each query.
      num_blocks: selection blocks to score, ``ceil(T / l')``.

    Returns:
      float32 ``[B, C, H, num_blocks]``.
    """
    batch, chunk, q_heads, num_slots = probs.shape
    first, weights = overlap_weights(block_length, block_stride, selection_block_size)
    group_probs = probs.reshape(batch, chunk, num_kv_heads, q_heads // num_kv_heads, num_slots)
    group_probs = group_probs.sum(axis=3)
    relative = (
        np.arange(num_blocks)[:, None] * (selection_block_size // block_stride)
        + first
        + np.arange(len(weights))[None, :]
    )
    slots = -(-query_starts // block_stride)[:, :, None, None] + relative
    in_range = (relative >= 0) & (slots < num_slots)
    flat = jnp.clip(slots, 0, num_slots - 1).reshape(batch, chunk, 1, -1)
    picked = jnp.take_along_axis(group_probs, flat, axis=-1)
    picked = picked.reshape(batch, chunk, num_kv_heads, num_blocks, len(weights))
    picked = jnp.where(in_range[:, :, None], picked, 0.0)
    return jnp.sum(picked * jnp.asarray(weights, jnp.float32), axis=-1)


def top_blocks(
    importance: jax.Array,
    positions: jax.Array,
    query_starts: jax.Array,
    *,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
) -> jax.Array:
    """Top-n blocks with forced initial and local blocks (Eq. 11).

    Args:
      importance: float32 ``[B, C, H, Nb]``.
      positions: int32 ``[B, C]`` (or ``[1, C]``); query_starts: int32 ``[B, C]``.

    Returns:
      int32 ``[B, C, H, n]``: selected blocks ascending, ``-1`` padding last. Ties
      go to the lower block index.
    """
    num_blocks = importance.shape[-1]
    if num_blocks < num_selected:
        pad = [(0, 0)] * 3 + [(0, num_selected - num_blocks)]
        importance = jnp.pad(importance, pad, constant_values=-jnp.inf)
    blocks = jnp.arange(importance.shape[-1], dtype=jnp.int32)
    current = ((positions - query_starts) // selection_block_size)[:, :, None, None]
    visible = blocks <= current
    forced = (blocks < num_initial_blocks) | (blocks > current - num_local_blocks)
    score = jnp.where(visible, jnp.where(forced, jnp.inf, importance), -jnp.inf)
    values, chosen = jax.lax.top_k(jax.lax.stop_gradient(score), num_selected)
    return ascending_unused_last(jnp.where(values == -jnp.inf, -1, chosen))


def ascending_unused_last(blocks: jax.Array) -> jax.Array:
    """Sorts block numbers ``[..., n]`` ascending with the unused slots (``-1``) last; int32."""
    unused = jnp.iinfo(jnp.int32).max
    ordered = jnp.sort(jnp.where(blocks < 0, unused, blocks.astype(jnp.int32)), axis=-1)
    return jnp.where(ordered == unused, -1, ordered)


def select_blocks_from_probabilities(
    probs: jax.Array,
    *,
    num_kv_heads: int,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Compression probabilities ``[B, T, HQ, Tc]`` to ``block_indices [B, T, H, n]``.

    The whole of Eqs. 9-11 on probabilities already in memory; see
    :func:`nsa_jax.select_blocks` for the memory-linear op used by the layer.
    """
    batch, length = probs.shape[:2]
    starts = segment_starts(segment_ids, batch, length)
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    importance = block_importance(
        probs.astype(jnp.float32),
        starts,
        num_kv_heads=num_kv_heads,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_blocks=-(-length // selection_block_size),
    )
    return top_blocks(
        importance,
        positions,
        starts,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
    )


def select_for_chunk(
    q: jax.Array,
    lse: jax.Array,
    positions: jax.Array,
    query_starts: jax.Array,
    token_starts: jax.Array,
    k_cmp: jax.Array,
    *,
    num_blocks: int,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
) -> jax.Array:
    """Eqs. 9-11 for a chunk of queries, from the compressed keys and saved ``lse``.

    Args:
      q: ``[B, C, HQ, Dk]``; lse: ``[B, C, HQ]``; positions: int32 ``[B, C]``
        (or ``[1, C]``); query_starts: int32 ``[B, C]``; token_starts: int32
        ``[B, Tc]``; k_cmp: ``[B, Tc, H, Dk]``.
      num_blocks: selection blocks that exist, ``ceil(T / l')``.

    Returns:
      int32 ``[B, C, H, n]`` as :func:`top_blocks`.
    """
    probs = compression_probabilities(
        q, lse, positions, query_starts, token_starts, k_cmp, block_length=block_length, scale=scale
    )
    importance = block_importance(
        probs,
        query_starts,
        num_kv_heads=k_cmp.shape[2],
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_blocks=num_blocks,
    )
    return top_blocks(
        importance,
        positions,
        query_starts,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
    )


def select_blocks(
    q: jax.Array,
    k_cmp: jax.Array,
    lse: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Reference block selection; arguments as :func:`nsa_jax.select_blocks`.

    Recomputes the compression probabilities chunk by chunk from ``lse`` so that
    memory stays linear in ``T``.
    """
    batch, length = q.shape[:2]
    q = jax.lax.stop_gradient(q)
    k_cmp = jax.lax.stop_gradient(k_cmp)
    starts = segment_starts(segment_ids, batch, length)
    token_starts = compressed_token_starts(
        starts, k_cmp.shape[1], block_length=block_length, block_stride=block_stride
    )

    def chunk_fn(_, positions, q_chunk, lse_chunk, start_chunk):
        chosen = select_for_chunk(
            q_chunk,
            lse_chunk,
            positions,
            start_chunk,
            token_starts,
            k_cmp,
            num_blocks=-(-length // selection_block_size),
            block_length=block_length,
            block_stride=block_stride,
            selection_block_size=selection_block_size,
            num_selected=num_selected,
            num_initial_blocks=num_initial_blocks,
            num_local_blocks=num_local_blocks,
            scale=scale,
        )
        return (chosen,)

    (indices,) = map_query_chunks(chunk_fn, (q, lse, starts))
    return indices
