"""The forced blocks of the selected branch attended per block of queries (Triton lowering).

Spec, "Top-n (Eq. 11)": every query selects the initial block and its two local blocks (the
block holding it and the one before). Those three blocks are the same for all ``l'`` queries
of a block, so one program per (block of queries, KV head) can read them once and attend them
as a dense tile for all the KV head's query heads, where the tile kernel of
:mod:`pallas_kernels.gpu.selection_forward_mosaic` would gather the queries and write a partial
output per (query, forced block): 3 of the ``n = 16`` partials of every query, about 3.2 GB of
the 17 GB written and read at T = 64K, H = 4.

A (query, slot) pair is *forced* when its block is block 0, the query's block or the one before
(whatever the caller's indices: a slot that does not select such a block stays with the tile
kernel). Every forced pair of a key tile ``a >= 1`` belongs to a query of blocks ``a`` or
``a + 1`` and every pair of tile 0 is forced, so in the inverse map's query-ordered lists the
forced pairs are a prefix of each list (:func:`list_firsts`): the tile kernel starts past it.
:func:`attend_forced` attends each forced block once per query, weighted by how many of the
query's slots select it (a block listed twice counts twice, as in the reference), and writes its
partial into the row of one of the query's forced pairs, which the XLA merge then reads as any
other.

Measured on the H200 at T = 64K (experiments/results/session27_h200.md): the tile kernel saves
1.6-2.3 ms (Dk = 128) and 1.9 ms (Dk = 192), the merge 0.4 ms, and this kernel takes 1.7 and
2.1 ms (4 queries a program, 4 warps, 1 stage; 2.0 and 2.3 ms with one query head a program,
latency-bound at 2 blocks an SM). The branch's forward is no faster, so it stays off by default.
Two designs before it were slower: folding the other partials in this kernel (7.6-7.8 ms for the
kernel, against the XLA merge's 4.2) and the forced partial as a concatenated extra slot of the
merge (6.8 ms for the merge).

Served where the Mosaic kernels serve (aligned blocks, no segments). Runs in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gpu.tiles import (
    MASKED,
    column_pieces,
    empty_softmax_state,
    lanes,
    load,
    load_pieces,
    online_softmax_step,
    padded,
    tile_mask,
)

# The forced candidates of a query in block ``b``: block 0, block ``b - 1`` (from 1 on) and block
# ``b`` (from 1 on); their counts take an empty fourth lane too, for a power-of-two width.
_CANDIDATES = 3
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


class _Rows:
    """One program's rows: ``positions`` consecutive queries (grid axis 1) times the ``G`` query
    heads of one KV head (axis 0); row ``r`` is query ``r // G`` of the program, head ``r % G``."""

    def __init__(self, geo, positions: int):
        self.geo = geo
        rows = jnp.arange(positions * geo.group)
        self.local, self.head = jax.lax.div(rows, geo.group), jax.lax.rem(rows, geo.group)
        self.first = pl.program_id(1) * positions
        self.query = self.first + self.local
        self.in_range = self.query < geo.length

    def q_pieces(self, q_ref) -> list[jax.Array]:
        """The rows' queries from ``q_ref [P, G, Dk']`` as :func:`column_pieces` tiles ``[rows, width]``."""
        geo = self.geo
        return [
            plt.load(
                q_ref.at[self.local[:, None], self.head[:, None], offset + jnp.arange(width)[None, :]],
                mask=tile_mask(self.in_range, lanes(min(geo.dk - offset, width), width)),
                other=0,
            )
            for offset, width in column_pieces(geo.dk)
        ]

    def forced_block(self, candidate, counts_ref, k_ref, v_ref):
        """``(count [rows], valid [rows, l'], k pieces, v [l', Dv'])`` of forced candidate
        ``candidate`` (traced; :func:`forced_pairs`) from ``k_ref [T, Dk']``, ``v_ref [T, Dv']``
        and ``counts_ref [P, 4]``.

        The candidates' counts are 0 where a candidate does not exist (block 0's queries have
        neither local candidate), so each is read from a block in range without a test."""
        geo = self.geo
        block = jax.lax.div(self.first, geo.block_size)
        source = jnp.where(candidate == 0, 0, jnp.maximum(block + candidate - 2, 0))
        keys = source * geo.block_size + jnp.arange(geo.block_size)
        key_in_range = keys < geo.length
        count = plt.load(counts_ref.at[self.local, candidate], mask=self.in_range, other=0)
        seen = (count > 0)[:, None] & (keys[None, :] <= self.query[:, None]) & key_in_range[None, :]
        rows = pl.ds(source * geo.block_size, geo.block_size)
        k = load_pieces(k_ref, rows, geo.dk, key_in_range)
        v = load(v_ref.at[rows, :], tile_mask(key_in_range, lanes(geo.dv, geo.dv_padded)))
        return count, seen, k, v


def _forced_kernel(
    counts_ref, k_ref, v_ref, q_ref, row_ref, _out_rows, _lse_rows, out_rows_ref, lse_rows_ref,
    *, geo, positions,
):  # fmt: skip
    """``P = positions`` queries and the ``G`` query heads of one KV head: ``q_ref [P, G, Dk']``,
    ``k_ref [T, Dk']``, ``v_ref [T, Dv']``, ``counts_ref [P, 4]``. Writes the forced blocks' partial
    output and its log-sum-exp (base 2) of query head ``j`` into row ``row_ref[p] * G + j`` of the
    KV head's ``out_rows_ref [R, Dv']`` and ``lse_rows_ref [R]`` (none where ``row_ref[p] == -1``;
    the same buffers as ``_out_rows`` and ``_lse_rows``, which are not read)."""
    block = _Rows(geo, positions)
    q = block.q_pieces(q_ref)

    def forced(candidate, state):
        count, valid, k, v = block.forced_block(candidate, counts_ref, k_ref, v_ref)
        # A block on c of the query's slots is c copies of its keys in the reference's softmax.
        bias = jnp.log2(jnp.maximum(count, 1).astype(jnp.float32))
        return online_softmax_step(
            state, q, k, v, valid, geo.log2_scale, geo.precision, flush=geo.flush_exp2, bias=bias
        )

    # A loop over the candidates, not three unrolled blocks: ptxas spilled registers for unrolled
    # versions of these kernels (experiments/kernel_resources.py, session 26).
    acc, row_max, row_sum = jax.lax.fori_loop(
        0, _CANDIDATES, forced, empty_softmax_state(positions * geo.group, geo.dv_padded)
    )
    seen = row_sum > 0
    row = plt.load(row_ref.at[block.local], mask=block.in_range, other=-1)
    live = block.in_range & (row >= 0)
    at = jnp.maximum(row, 0) * geo.group + block.head
    columns = jnp.arange(geo.dv_padded)
    out = acc / jnp.where(seen, row_sum, 1.0)[:, None]
    cells = live[:, None] & (columns < geo.dv)[None, :]
    plt.store(out_rows_ref.at[at[:, None], columns[None, :]], out.astype(out_rows_ref.dtype), mask=cells)
    lse = jnp.where(seen, row_max + jnp.log2(jnp.where(seen, row_sum, 1.0)), MASKED)
    plt.store(lse_rows_ref.at[at], lse, mask=live)


def attend_forced(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    counts: jax.Array,
    forced_rows: jax.Array,
    out_rows: jax.Array,
    lse_rows: jax.Array,
    geo,
) -> tuple[jax.Array, jax.Array]:
    """The forced blocks' partial of selected attention (Eq. 11), written as one of each query's
    partials: the tile kernel's rows with the forced blocks' partial at ``forced_rows``.

    Args:
      q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
      counts: ``[B, T, H, 4]`` from :func:`forced_pairs`.
      forced_rows: int32 ``[B, T, H]``, the pair index ``i`` (rows ``16 i ..``) that takes the
        query's forced partial, one of its forced pairs' (the tile kernel computes no partial
        the merge reads there); ``-1``: the query selects no forced block.
      out_rows, lse_rows: the tile kernel's partials ``[B, H, R * G, Dv]`` and log-sum-exps
        ``[B, H, R * G]`` (float32, base 2), updated in place.
      geo: the selected attention's static geometry (``pallas_kernels.gpu.selection._Geometry``):
        shapes, scale, precision, interpret mode, and ``tuning.merge_queries`` (queries a program,
        each with the ``G`` query heads of its KV head; a power of two dividing ``l'``),
        ``merge_warps`` and ``merge_stages``.

    Returns:
      ``(out_rows, lse_rows)`` with the forced partials written.
    """
    batch, length, heads, _ = k.shape
    positions = geo.tuning.merge_queries
    if geo.block_size % positions:
        raise ValueError(f"merge_queries must divide the block size {geo.block_size}, got {positions}")

    def spec(block: tuple, index) -> pl.BlockSpec:
        return pl.BlockSpec(block, lambda h, g, b: index(h, g, b) + (0,) * (len(block) - 3))

    per_query = lambda *tail: spec((None, positions, None, *tail), lambda h, g, b: (b, g, h))
    whole = lambda width: spec((None, length, None, width), lambda h, g, b: (b, 0, h))
    per_row = lambda x: spec((None, None, x.shape[2], *map(padded, x.shape[3:])), lambda h, g, b: (b, h, 0))
    rows = (out_rows, lse_rows)
    return pl.pallas_call(
        functools.partial(_forced_kernel, geo=geo, positions=positions),
        grid=(heads, pl.cdiv(length, positions), batch),
        in_specs=[
            per_query(_COUNT_LANES),
            whole(geo.dk_padded),
            whole(geo.dv_padded),
            per_query(geo.group, geo.dk_padded),
            per_query(),
            *map(per_row, rows),
        ],
        out_specs=list(map(per_row, rows)),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in rows],
        input_output_aliases={5: 0, 6: 1},
        compiler_params=geo.params(geo.tuning.merge_warps, geo.tuning.merge_stages),
        interpret=geo.interpret,
        name="nsa_selected_fwd_forced",
    )(counts, k, v, q.reshape(batch, length, heads, geo.group, -1), forced_rows, *rows)
