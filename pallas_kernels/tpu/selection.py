"""Selected attention (spec, "Selected attention (Eq. 12)") as Pallas TPU kernels.

Arguments as :func:`nsa_jax.selected_attention`. A query tile holds ``P``
consecutive query positions times the ``G`` heads of one KV head. Its key-tile list
is the sorted union of the key tiles touched by the blocks its queries selected
(``-1`` slots dropped, duplicates removed); the kernels of
:mod:`pallas_kernels.tpu.core` fetch those tiles through the scalar-prefetched list
and mask per row, so each K/V tile is loaded once per query tile whatever the
number of queries and heads that chose it. Key tiles are ``l'`` rounded up to 8
rows; with segment ids a block may start mid-tile and touch two tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax.segments import segment_starts
from pallas_kernels.tpu import core, layout
from pallas_kernels.tpu.block_sizes import SUBLANES, TpuBlockSizes, block_sizes_for, round_up
from pallas_kernels.tpu.inverse_map import clamp_to_last_valid, unique_sorted


def check(q, k, v, block_indices, **_) -> None:
    """Raises ``ValueError`` for arguments the TPU kernels do not serve (only float16)."""
    layout.check_dtype(q)


def key_tile_size(block_size: int) -> int:
    """Keys per key tile of the selection kernels: ``l'`` rounded up to 8 rows."""
    return round_up(block_size, SUBLANES)


def tile_lists(
    first_keys: jax.Array,
    *,
    block_size: int,
    key_tile: int,
    num_key_tiles: int,
    queries_per_tile: int,
    aligned: bool,
) -> tuple[jax.Array, jax.Array]:
    """Sorted union of the key tiles each query tile reads.

    Args:
      first_keys: int32 ``[B, T, H, n]``, first key of each selected block (absolute),
        ``core.INVALID`` for unused slots.
      aligned: blocks start on key-tile boundaries and fit in one tile.

    Returns:
      ``(tiles [B, H, nQ, U], counts [B, H, nQ])``, unused steps repeating the last
      valid tile, ``U = min(P * n * E, nK)`` with ``E`` tiles per block.
    """
    batch, length, heads, slots = first_keys.shape
    parts = 1 if aligned else (block_size - 2 + key_tile) // key_tile + 1
    positions = jnp.arange(length, dtype=jnp.int32)[None, :, None, None]
    valid = first_keys >= 0
    first = jnp.where(valid, first_keys // key_tile, num_key_tiles)
    # Keys after the query are masked anyway: a tile past the query's own is not read.
    last = jnp.minimum((first_keys + block_size - 1) // key_tile, positions // key_tile)
    candidates = [jnp.where(valid & (first + e <= last), first + e, num_key_tiles) for e in range(parts)]
    candidates = jnp.stack(candidates, axis=-1).reshape(batch, length, heads, slots * parts)
    num_q = -(-length // queries_per_tile)
    pad = num_q * queries_per_tile - length
    candidates = jnp.pad(candidates, [(0, 0), (0, pad), (0, 0), (0, 0)], constant_values=num_key_tiles)
    candidates = candidates.reshape(batch, num_q, queries_per_tile, heads, slots * parts)
    candidates = candidates.transpose(0, 3, 1, 2, 4).reshape(batch, heads, num_q, -1)
    width = min(candidates.shape[-1], num_key_tiles)
    tiles, counts = unique_sorted(candidates, num_key_tiles, width)
    return clamp_to_last_valid(tiles, counts), counts


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "interpret", "block_sizes"))
def selected_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    *,
    block_size: int,
    scale: float,
    segment_ids: jax.Array | None = None,
    interpret=False,
    block_sizes: TpuBlockSizes | None = None,
) -> jax.Array:
    """Selected attention on TPU; arguments as :func:`nsa_jax.selected_attention`.

    Args:
      interpret: ``True`` for Pallas TPU interpret mode (``pltpu.InterpretParams()``),
        or an ``InterpretParams`` (e.g. with ``detect_races=True``).
      block_sizes: overrides the table entry of :mod:`pallas_kernels.tpu.block_sizes`.
    """
    layout.check_dtype(q)
    batch, length, q_heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    slots = block_indices.shape[-1]
    sizes = block_sizes or block_sizes_for(dk, dv, q.dtype)
    key_tile = key_tile_size(block_size)
    num_key_tiles = -(-length // key_tile)
    per_tile = layout.queries_per_tile(group, length, sizes.query_rows)
    num_q = -(-length // per_tile)
    starts = segment_starts(segment_ids, batch, length)

    indices = jax.lax.stop_gradient(block_indices).astype(jnp.int32)
    first_keys = jnp.where(indices >= 0, starts[:, :, None, None] + indices * block_size, core.INVALID)
    tiles, counts = tile_lists(
        first_keys,
        block_size=block_size,
        key_tile=key_tile,
        num_key_tiles=num_key_tiles,
        queries_per_tile=per_tile,
        aligned=segment_ids is None and key_tile == block_size,
    )
    positions = jnp.broadcast_to(
        jnp.arange(length, dtype=jnp.int32)[None, :, None, None], (batch, length, kv_heads, 1)
    )
    info = jnp.concatenate([first_keys, positions], axis=-1).transpose(0, 2, 1, 3)
    row_info = layout.rows_info(info, num_q * per_tile, group, (core.INVALID,) * slots + (-1,))

    cfg = core.Config(
        mode="select",
        scale=float(scale),
        rows=per_tile * group,
        key_tile=key_tile,
        width=tiles.shape[-1],
        num_slots=slots,
        span=block_size,
        smem_words=sizes.smem_words,
        interpret=core.interpret_params(interpret),
    )
    out, _ = core.attend(
        layout.to_rows(q, kv_heads, num_q * per_tile),
        layout.to_keys(k, num_key_tiles * key_tile),
        layout.to_keys(v, num_key_tiles * key_tile),
        row_info,
        None,
        tiles,
        counts,
        cfg,
    )
    return layout.from_rows(out, length, q_heads, dv)
