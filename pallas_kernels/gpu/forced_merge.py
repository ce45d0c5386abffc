"""The keys-to-queries selected forward's merge, attending the forced blocks itself (Triton lowering).

Spec, "Top-n (Eq. 11)": every query selects the initial block and its two local blocks (the
block holding it and the one before). Those three blocks are the same for all ``l'`` queries
of a block, so one program per (block of queries, query head) can read them once and attend
them as a dense tile, where the tile kernel of :mod:`pallas_kernels.gpu.selection_forward_mosaic`
would write a partial output per (query, forced block) and read it back: 3 of the ``n = 16``
partials of every query, about 3.2 GB of the 17 GB written and read at T = 64K, H = 4
(experiments/results/session23_h200.md bounds the design at 5.76 ms against 7.11).

A (query, slot) pair is *forced* when its block is block 0, the query's block or the one before
(whatever the caller's indices: a slot that does not select such a block stays with the tile
kernel). Every forced pair of a key tile ``a >= 1`` belongs to a query of blocks ``a`` or
``a + 1`` and every pair of tile 0 is forced, so in the inverse map's query-ordered lists the
forced pairs are a prefix of each list (:func:`list_firsts`): the tile kernel starts past it. The
merge then attends each forced block once per query, weighted by how many of the query's slots
select it (a block listed twice counts twice, as in the reference), and folds in the tile
kernel's partials of the other slots by their log-sum-exps.

Served where the Mosaic forward serves (aligned blocks, no segments). Runs in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gpu.tiles import (
    MASKED,
    empty_softmax_state,
    lanes,
    load,
    load_pieces,
    online_softmax_step,
    store,
    tile_mask,
)

# Lanes of the counts: the three forced candidates of a query in block ``b`` (block 0, block
# ``b - 1`` from 1 on, block ``b`` from 1 on) and an empty fourth, for a power-of-two width.
_COUNT_LANES = 4


def forced_pairs(key_starts: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Which (query, slot) pairs select a forced block, and how many slots select each candidate.

    Args:
      key_starts: int32 ``[B, T, H, n]``, absolute first keys of aligned blocks (``-1``: none).
      block_size: ``l'``.

    Returns:
      ``(forced bool [B, T, H, n], counts int32 [B, T, H, 4])``: ``counts[..., c]`` is the number
      of the query's slots on candidate ``c`` (block 0; the block before the query's, from block 1
      on; the query's block, from block 1 on); lane 3 is 0.
    """
    length = key_starts.shape[1]
    tile = jnp.where(key_starts >= 0, key_starts // block_size, -2)
    own = (jnp.arange(length, dtype=jnp.int32) // block_size)[None, :, None, None]
    candidates = (tile == 0, (tile >= 1) & (tile == own - 1), (tile >= 1) & (tile == own))
    counts = [jnp.sum(c, axis=-1, dtype=jnp.int32) for c in candidates]
    counts.append(jnp.zeros_like(counts[0]))
    return candidates[0] | candidates[1] | candidates[2], jnp.stack(counts, axis=-1)


def list_firsts(offsets: jax.Array, counts: jax.Array, block_size: int, step: int) -> jax.Array:
    """int32 ``[B, H, num_tiles]``: where each tile's list starts once its forced prefix is left
    out, rounded down to whole ``step`` pairs from the list's start (the tile kernel writes whole
    steps; the few forced pairs it then computes are never read).

    Args:
      offsets: ``[B, H, num_tiles + 1]``, the inverse map's list offsets.
      counts: :func:`forced_pairs`' counts ``[B, T, H, 4]``.
    """
    batch, length, heads, _ = counts.shape
    num_tiles = offsets.shape[-1] - 1
    by_block = jnp.pad(counts, ((0, 0), (0, num_tiles * block_size - length), (0, 0), (0, 0)))
    by_block = by_block.reshape(batch, num_tiles, block_size, heads, _COUNT_LANES).sum(axis=2)
    by_block = jnp.transpose(by_block, (0, 2, 1, 3))  # [B, H, num_tiles, 4]
    # Tile a >= 1: its own block's pairs on the query's block, block a + 1's on the block before.
    before_next = jnp.pad(by_block[..., 1:, 1], ((0, 0), (0, 0), (0, 1)))
    forced = by_block[..., 2] + before_next
    lengths = offsets[..., 1:] - offsets[..., :-1]
    forced = forced.at[..., 0].set(lengths[..., 0])  # every pair of tile 0 is forced
    return offsets[..., :-1] + forced // step * step


def _merge_kernel(
    counts_ref,
    positions_ref,
    q_ref,
    k_ref,
    v_ref,
    rows_ref,
    lse_rows_ref,
    o_ref,
    lse_ref,
    *,
    geo,
    queries,
    slots,
):
    """One block of ``Q = queries`` queries and one query head: ``q_ref [Q, Dk']``, ``k_ref [T, Dk']``,
    ``v_ref [T, Dv']``, ``counts_ref [Q, 4]``, ``positions_ref [Q, slots]`` (padded partial rows,
    ``-1``: none), ``rows_ref [R, Dv']`` and ``lse_rows_ref [R]`` of the query's KV head.
    Writes ``o_ref [Q, Dv']`` and ``lse_ref [Q]`` (base 2)."""
    head, first = pl.program_id(0), pl.program_id(1) * queries
    query = first + jnp.arange(queries)
    in_range = query < geo.length
    q = load_pieces(q_ref, slice(None), geo.dk, in_range)
    block = jax.lax.div(first, geo.block_size)
    state = empty_softmax_state(queries, geo.dv_padded)
    offsets = jnp.arange(geo.block_size)
    dv_lanes = lanes(geo.dv, geo.dv_padded)
    # The candidates' counts are 0 where a candidate does not exist (block 0's queries have
    # neither local candidate), so each is attended from a block in range without a test.
    for candidate, source in enumerate((0, jnp.maximum(block - 1, 0), block)):
        keys = source * geo.block_size + offsets
        key_in_range = keys < geo.length
        count = counts_ref[:, candidate]
        valid = (in_range & (count > 0))[:, None] & (keys[None, :] <= query[:, None]) & key_in_range[None, :]
        rows = pl.ds(source * geo.block_size, geo.block_size)
        k = load_pieces(k_ref, rows, geo.dk, key_in_range)
        v = load(v_ref.at[rows, :], tile_mask(key_in_range, dv_lanes))
        # A block on c of the query's slots is c copies of its keys in the reference's softmax.
        bias = jnp.log2(jnp.maximum(count, 1).astype(jnp.float32))
        state = online_softmax_step(
            state, q, k, v, valid, geo.log2_scale, geo.precision, flush=geo.flush_exp2, bias=bias
        )

    group_head = jax.lax.rem(head, geo.group)
    columns = jnp.arange(geo.dv_padded)

    def partial(slot, state):
        acc, row_max, row_sum = state
        position = positions_ref[:, slot]
        live = in_range & (position >= 0)
        at = jnp.maximum(position, 0) * geo.group + group_head
        lse = plt.load(lse_rows_ref.at[at], mask=live, other=MASKED)
        cells = live[:, None] if dv_lanes is None else live[:, None] & dv_lanes[None, :]
        out = plt.load(rows_ref.at[at[:, None], columns[None, :]], mask=cells, other=0)
        new_max = jnp.maximum(row_max, lse)
        alpha = jnp.exp2(row_max - new_max)
        weight = jnp.where(live, jnp.exp2(lse - new_max), 0.0)
        acc = acc * alpha[:, None] + weight[:, None] * out.astype(jnp.float32)
        return acc, new_max, row_sum * alpha + weight

    acc, row_max, row_sum = jax.lax.fori_loop(0, slots, partial, state)
    seen = row_sum > 0
    store(o_ref, acc / jnp.where(seen, row_sum, 1.0)[:, None], tile_mask(in_range, dv_lanes))
    lse = jnp.where(seen, row_max + jnp.log2(jnp.where(seen, row_sum, 1.0)), 0.0)
    plt.store(lse_ref, lse, mask=in_range)


def merge_with_forced(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    counts: jax.Array,
    positions: jax.Array,
    out_rows: jax.Array,
    lse_rows: jax.Array,
    geo,
) -> tuple[jax.Array, jax.Array]:
    """Selected attention's output: the forced blocks attended here, the other slots' partials merged.

    Args:
      q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
      counts: ``[B, T, H, 4]`` from :func:`forced_pairs`.
      positions: int32 ``[B, T, H, n]``, each non-forced listed pair's padded row index into
        ``out_rows`` (rows ``16 i ..``; ``-1``: forced or unlisted).
      out_rows, lse_rows: the tile kernel's partials ``[B, H, R * G, Dv]`` and their log-sum-exps
        ``[B, H, R * G]`` (float32, base 2).
      geo: the selected attention's static geometry (``pallas_kernels.gpu.selection._Geometry``):
        shapes, scale, precision, interpret mode, and ``tuning.merge_queries`` (queries a program,
        a power of two dividing ``l'``), ``merge_warps`` and ``merge_stages``.

    Returns:
      ``(out [B, T, HQ, Dv]`` in ``q.dtype``, ``lse [B, T, H, G]`` float32 base 2; 0 where a query
      attends to nothing).
    """
    batch, length, q_heads, _ = q.shape
    heads, group, queries = k.shape[2], geo.group, geo.tuning.merge_queries
    if geo.block_size % queries:
        raise ValueError(f"merge_queries must divide the block size {geo.block_size}, got {queries}")
    slots_padded = pl.next_power_of_2(geo.slots)
    positions = jnp.pad(
        positions, ((0, 0), (0, 0), (0, 0), (0, slots_padded - geo.slots)), constant_values=-1
    )
    num_rows = out_rows.shape[2]

    def per_query_head(*trailing):
        zeros = (0,) * len(trailing)
        return pl.BlockSpec((None, queries, None, *trailing), lambda h, g, b: (b, g, h, *zeros))

    def per_kv_head(*trailing):
        zeros = (0,) * len(trailing)
        return pl.BlockSpec(
            (None, queries, None, *trailing), lambda h, g, b: (b, g, jax.lax.div(h, group), *zeros)
        )

    def whole_kv_head(depth):
        return pl.BlockSpec((None, length, None, depth), lambda h, g, b: (b, 0, jax.lax.div(h, group), 0))

    def kv_head_rows(*trailing):
        zeros = (0,) * len(trailing)
        return pl.BlockSpec(
            (None, None, num_rows, *trailing), lambda h, g, b: (b, jax.lax.div(h, group), 0, *zeros)
        )

    out, lse = pl.pallas_call(
        functools.partial(_merge_kernel, geo=geo, queries=queries, slots=slots_padded),
        grid=(q_heads, pl.cdiv(length, queries), batch),
        in_specs=[
            per_kv_head(_COUNT_LANES),
            per_kv_head(slots_padded),
            per_query_head(geo.dk_padded),
            whole_kv_head(geo.dk_padded),
            whole_kv_head(geo.dv_padded),
            kv_head_rows(geo.dv_padded),
            kv_head_rows(),
        ],
        out_specs=[per_query_head(geo.dv_padded), per_query_head()],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, q_heads, geo.dv), q.dtype),
            jax.ShapeDtypeStruct((batch, length, q_heads), jnp.float32),
        ],
        compiler_params=geo.params(geo.tuning.merge_warps, geo.tuning.merge_stages),
        interpret=geo.interpret,
        name="nsa_selected_fwd_forced_merge",
    )(counts, positions, q, k, v, out_rows, lse_rows)
    return out, lse.reshape(batch, length, heads, group)
