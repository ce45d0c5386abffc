"""Tile lists of the TPU kernels and their inverse.

The forward and dQ kernels of :mod:`pallas_kernels.tpu.core` run one program per
(batch, KV head, query tile, list step); step ``u`` of query tile ``i`` reads key tile
``tiles[b, h, i, u]`` for ``u < counts[b, h, i]``. The dK/dV kernel needs the inverse:
for each key tile, the query tiles that read it. :func:`build_inverse_map` builds it
with one sort, as a flat list of (key tile, query tile) entries grouped by key tile,
so the backward does work proportional to the forward's (``O(T * n)`` for selection)
instead of scanning every later query for every block (spec, "Kernel design").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unique_sorted(candidates: jax.Array, num_tiles: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Distinct key tiles of each row, ascending, padded with ``num_tiles``.

    Args:
      candidates: int32 ``[..., C]`` key tiles; values ``>= num_tiles`` are invalid.
      num_tiles: the sentinel (number of key tiles).
      width: length of the returned lists (at least the largest distinct count).

    Returns:
      ``(tiles [..., width], counts [...])``.
    """
    candidates = jnp.minimum(candidates, num_tiles)
    ordered = jnp.sort(candidates, axis=-1)
    duplicate = jnp.concatenate(
        [jnp.zeros_like(ordered[..., :1], bool), ordered[..., 1:] == ordered[..., :-1]], axis=-1
    )
    ordered = jnp.sort(jnp.where(duplicate, num_tiles, ordered), axis=-1)
    counts = jnp.sum(ordered < num_tiles, axis=-1).astype(jnp.int32)
    if ordered.shape[-1] < width:
        pad = [(0, 0)] * (ordered.ndim - 1) + [(0, width - ordered.shape[-1])]
        ordered = jnp.pad(ordered, pad, constant_values=num_tiles)
    return ordered[..., :width].astype(jnp.int32), counts


def clamp_to_last_valid(tiles: jax.Array, counts: jax.Array) -> jax.Array:
    """Replaces the unused steps of each list by its last valid tile (0 if empty).

    The kernels skip those steps; repeating the previous block index means the TPU
    pipeline issues no new DMA for them.
    """
    width = tiles.shape[-1]
    steps = jnp.arange(width, dtype=jnp.int32)
    last = jnp.maximum(counts[..., None] - 1, 0)
    picked = jnp.take_along_axis(tiles, jnp.minimum(steps, last), axis=-1)
    return jnp.where(counts[..., None] > 0, picked, 0).astype(jnp.int32)


def build_inverse_map(
    tiles: jax.Array, counts: jax.Array, num_key_tiles: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inverts per-query-tile key-tile lists into entries grouped by key tile.

    Args:
      tiles: int32 ``[B, H, nQ, U]``; step ``u`` of query tile ``i`` reads key tile
        ``tiles[..., i, u]`` when ``u < counts[..., i]``.
      counts: int32 ``[B, H, nQ]``.
      num_key_tiles: ``nK``.

    Returns:
      ``(key_tiles, query_tiles, num_entries)``: ``key_tiles`` and ``query_tiles``
      int32 ``[B, H, nQ * U]``, the valid entries first, sorted by (key tile, query
      tile) so that each key tile's entries are consecutive; the unused tail repeats
      the last valid entry (``(0, 0)`` when there is none). ``num_entries`` int32
      ``[B, H]``.
    """
    batch, heads, num_q, width = tiles.shape
    valid = jnp.arange(width)[None, None, None, :] < counts[..., None]
    key = jnp.where(valid, tiles, num_key_tiles).reshape(batch, heads, num_q * width)
    query = jnp.broadcast_to(jnp.arange(num_q, dtype=jnp.int32)[:, None], (num_q, width))
    query = jnp.broadcast_to(query.reshape(-1), key.shape)
    key, query = jax.lax.sort((key, query), dimension=2, num_keys=2)
    num_entries = jnp.sum(counts, axis=-1).astype(jnp.int32)
    key = clamp_to_last_valid(key, num_entries)
    query = clamp_to_last_valid(query, num_entries)
    return key, query, num_entries


def touched_tiles(key_tiles: jax.Array, num_entries: jax.Array, num_key_tiles: int) -> jax.Array:
    """bool ``[B, H, nK]``: key tiles that appear among the valid entries."""
    batch, heads, width = key_tiles.shape
    valid = jnp.arange(width)[None, None, :] < num_entries[..., None]
    rows = jnp.arange(batch)[:, None, None]
    cols = jnp.arange(heads)[None, :, None]
    out = jnp.zeros((batch, heads, num_key_tiles + 1), bool)
    out = out.at[rows, cols, jnp.where(valid, key_tiles, num_key_tiles)].set(True)
    return out[..., :num_key_tiles]
