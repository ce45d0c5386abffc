"""Inverse of the block selection: for every key tile, the (query, slot) pairs that read it.

The dK/dV kernel of :mod:`pallas_kernels.gpu.selection` runs one program per key tile
and KV head; it loops over exactly the pairs listed here, so the backward does
``O(T * n)`` work instead of scanning every later query for every block
(spec, "Kernel design", weak points).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def key_tile_count(length: int, block_size: int) -> int:
    """``ceil(T / block_size)``: the aligned key tiles ``[a*l', (a+1)*l')`` of a row."""
    return -(-length // block_size)


def parts_per_slot(aligned: bool) -> int:
    """``E``: key tiles a selected block can touch (2 when blocks may straddle tiles)."""
    return 1 if aligned else 2


def build_inverse_map(
    key_starts: jax.Array, *, block_size: int, aligned: bool
) -> tuple[jax.Array, jax.Array]:
    """Groups the selected slots of every (batch, KV head) by the key tile they touch.

    Args:
      key_starts: int32 ``[B, T, H, n]``, first key of each selected block (absolute
        position, ``s0 + j * block_size``), ``-1`` for a slot that selects nothing.
      block_size: ``l'``; tile ``a`` holds keys ``[a*l', (a+1)*l')``.
      aligned: every valid start is a multiple of ``block_size`` (true without
        segment ids). Otherwise a block may straddle two tiles and is listed under
        both.

    Returns:
      ``(entries, offsets)``: entries int32 ``[B, H, T * n * E]`` (``E = 1`` if
      aligned else 2) holding ids ``(t * n + i) * E + part`` (``part`` 1 for the
      second tile of a straddling block, else 0), grouped by tile in
      ascending order (deterministic order within a tile); offsets int32
      ``[B, H, num_tiles + 1]`` such that tile ``a`` owns
      ``entries[..., offsets[a]:offsets[a + 1]]``. Unused slots sort after the last
      tile and are owned by none.
    """
    batch, length, heads, slots = key_starts.shape
    num_tiles = key_tile_count(length, block_size)
    rows = batch * heads
    starts = jnp.transpose(key_starts, (0, 2, 1, 3)).reshape(rows, length * slots)
    flat = jnp.broadcast_to(jnp.arange(length * slots, dtype=jnp.int32), starts.shape)
    first = jnp.where(starts >= 0, starts // block_size, num_tiles)
    if aligned:
        tiles, ids = first, flat
    else:
        straddles = (starts >= 0) & (starts % block_size != 0)
        second = jnp.where(straddles, jnp.minimum(first + 1, num_tiles), num_tiles)
        tiles = jnp.concatenate([first, second], axis=-1)
        ids = jnp.concatenate([2 * flat, 2 * flat + 1], axis=-1)
    # One stable 1-D sort on a (row, tile) key: XLA sorts a batch of rows 2x slower on the H200
    # (1.52 against 0.75 ms at T = 64K, H = 4; experiments/results/selection_h200.md, session 10).
    row_base = jnp.arange(rows, dtype=jnp.int32)[:, None] * (num_tiles + 1)
    keys, entries = jax.lax.sort(
        ((row_base + tiles).reshape(-1), ids.reshape(-1)), dimension=0, is_stable=True, num_keys=1
    )
    bounds = row_base + jnp.arange(num_tiles + 1, dtype=jnp.int32)
    # Unrolled: the default binary search is a while loop, which the GPU backend drives from the host
    # (23 iterations, ~1 ms under the profiler at T = 64K; the map alone took 0.73-1.0 ms, now 0.32;
    # experiments/results/selection_h200.md, session 11).
    offsets = jnp.searchsorted(keys, bounds.reshape(-1), side="left", method="scan_unrolled")
    offsets = offsets.reshape(rows, num_tiles + 1)
    offsets = offsets - jnp.arange(rows)[:, None] * ids.shape[-1]
    shape = (batch, heads)
    return entries.reshape(*shape, -1), offsets.reshape(*shape, -1).astype(jnp.int32)


def listed_parts(key_starts: jax.Array, *, block_size: int, aligned: bool) -> jax.Array:
    """Which (slot, part) pairs :func:`build_inverse_map` lists under some tile.

    Args:
      key_starts: int32 ``[B, T, H, n]`` as for :func:`build_inverse_map`.

    Returns:
      bool ``[B, T, H, n * E]``, index ``i * E + part``.
    """
    valid = key_starts >= 0
    if aligned:
        return valid
    num_tiles = key_tile_count(key_starts.shape[1], block_size)
    straddles = valid & (key_starts % block_size != 0) & (key_starts // block_size + 1 < num_tiles)
    return jnp.stack([valid, straddles], axis=-1).reshape(*key_starts.shape[:3], -1)
