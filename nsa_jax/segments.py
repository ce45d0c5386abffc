"""Packed sequences: where each segment starts, and where compressed tokens live.

Spec, "Variable length / packing": a segment is a maximal run of equal
``segment_ids``; compression and selection blocks are counted from the start of each
segment, and no branch attends across a boundary.

Compressed-token layout (used by every implementation): a compressed token ``i`` of
a segment that starts at ``s0`` covers raw tokens ``[s0 + i*d, s0 + i*d + l)`` and is
stored in slot ``ceil(s0 / d) + i``. This is injective over the whole packed row, so
``ceil(T / d)`` slots always suffice; a slot that holds no complete block is marked
invalid (start ``-1``). Without ``segment_ids`` slot ``i`` is simply compressed token
``i``, starting at ``i*d``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Position where the segment of each token starts.

    Args:
      segment_ids: int ``[B, T]`` or ``None`` (one segment per row).

    Returns:
      int32 ``[B, T]``; all zeros when ``segment_ids`` is ``None``.
    """
    positions = jnp.arange(length, dtype=jnp.int32)
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    new_segment = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return jax.lax.cummax(jnp.where(new_segment, positions, 0), axis=1)


def num_compressed_slots(length: int, block_stride: int) -> int:
    """``ceil(T / d)``: the compressed-token slots of a row of length ``T``."""
    return -(-length // block_stride)


def compressed_token_starts(
    starts: jax.Array, num_slots: int, *, block_length: int, block_stride: int
) -> jax.Array:
    """First raw position of the compressed token held in each slot.

    Args:
      starts: int32 ``[B, T]`` from :func:`segment_starts`.
      num_slots: number of slots to describe (at most ``ceil(T / d)``).

    Returns:
      int32 ``[B, num_slots]``, ``-1`` where the slot holds no complete block.
    """
    batch, length = starts.shape
    positions = jnp.arange(length, dtype=jnp.int32)
    offset = positions[None, :] - starts
    last = positions + block_length - 1
    fits = last < length
    start_of_last = jnp.take_along_axis(
        starts, jnp.minimum(last, length - 1)[None, :].repeat(batch, 0), axis=1
    )
    is_token_start = fits[None, :] & (start_of_last == starts) & (offset % block_stride == 0)
    slot = -(-starts // block_stride) + offset // block_stride
    slot = jnp.where(is_token_start, slot, num_slots)
    rows = jnp.arange(batch)[:, None]
    out = jnp.full((batch, num_slots), -1, jnp.int32)
    return out.at[rows, slot].set(jnp.broadcast_to(positions, (batch, length)), mode="drop")
