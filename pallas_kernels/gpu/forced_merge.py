"""The forced blocks of the selected branch attended per block of queries (Triton lowering).

Spec, "Top-n (Eq. 11)": every query selects the initial block and its two local blocks (the
block holding it and the one before). Those three blocks are the same for all ``l'`` queries
of a block, so one program per (block of queries, query head) can read them once and attend
them as a dense tile, where the tile kernel of :mod:`pallas_kernels.gpu.selection_forward_mosaic`
would gather the queries and write a partial output per (query, forced block): 3 of the
``n = 16`` partials of every query, about 3.2 GB of the 17 GB written and read at T = 64K, H = 4.

A (query, slot) pair is *forced* when its block is block 0, the query's block or the one before
(whatever the caller's indices: a slot that does not select such a block stays with the tile
kernel). Every forced pair of a key tile ``a >= 1`` belongs to a query of blocks ``a`` or
``a + 1`` and every pair of tile 0 is forced, so in the inverse map's query-ordered lists the
forced pairs are a prefix of each list (:func:`list_firsts`): the tile kernel starts past it.
:func:`attend_forced` attends each forced block once per query, weighted by how many of the
query's slots select it (a block listed twice counts twice, as in the reference), and writes one
partial a query that the XLA merge folds in with the tile kernel's. (Folding the other partials
in this kernel instead, a gather of 13 rows a query, took 7.6-7.8 ms at T = 64K on the H200
against XLA's 4.2 ms for all 16: experiments/results/session27_h200.md.)

The backward's dQ works the same way (:func:`dq_with_forced`): the Mosaic tile kernel of
:mod:`pallas_kernels.gpu.selection_mosaic` still adds the forced pairs' dK and dV (those sum over
every query that selects a block, block 0's over all of them) but writes no dQ rows for the steps
of the prefix, and one program per block of queries and query head computes the forced blocks'
``dS K`` from ``q``, ``dout``, the log-sum-exp and ``delta`` while summing the other pairs' rows:
about 4.8 GB of the 25.8 GB of bf16 dQ rows written and read at T = 64K, Dk = 192.

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
    dot,
    dot_nt,
    dot_nt_pieces,
    empty_softmax_state,
    exp2_affine,
    lanes,
    load,
    load_pieces,
    online_softmax_step,
    padded,
    store,
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


class _QueryBlock:
    """One program's ``queries`` consecutive queries (grid axis 1) of one query head (axis 0)."""

    def __init__(self, geo, queries: int):
        self.geo = geo
        self.head, self.first = pl.program_id(0), pl.program_id(1) * queries
        self.query = self.first + jnp.arange(queries)
        self.in_range = self.query < geo.length
        self.group_head = jax.lax.rem(self.head, geo.group)

    def forced_block(self, candidate, counts_ref, k_ref, v_ref):
        """``(count [Q], valid [Q, l'], k pieces, v [l', Dv'])`` of forced candidate ``candidate``
        (traced; :func:`forced_pairs`) from ``k_ref [T, Dk']``, ``v_ref [T, Dv']``, ``counts_ref [Q, 4]``.

        The candidates' counts are 0 where a candidate does not exist (block 0's queries have
        neither local candidate), so each is read from a block in range without a test."""
        geo = self.geo
        block = jax.lax.div(self.first, geo.block_size)
        source = jnp.where(candidate == 0, 0, jnp.maximum(block + candidate - 2, 0))
        keys = source * geo.block_size + jnp.arange(geo.block_size)
        key_in_range = keys < geo.length
        count = counts_ref[:, candidate]
        seen = (self.in_range & (count > 0))[:, None] & (keys[None, :] <= self.query[:, None])
        rows = pl.ds(source * geo.block_size, geo.block_size)
        k = load_pieces(k_ref, rows, geo.dk, key_in_range)
        v = load(v_ref.at[rows, :], tile_mask(key_in_range, lanes(geo.dv, geo.dv_padded)))
        return count, seen & key_in_range[None, :], k, v


def _forced_kernel(
    counts_ref, k_ref, v_ref, q_ref, row_ref, _out_rows, _lse_rows, out_rows_ref, lse_rows_ref,
    *, geo, queries,
):  # fmt: skip
    """One block of ``Q = queries`` queries and one query head: ``q_ref [Q, Dk']``, ``k_ref [T, Dk']``,
    ``v_ref [T, Dv']``, ``counts_ref [Q, 4]``. Writes the forced blocks' partial output and its
    log-sum-exp (base 2) into row ``row_ref [Q]`` (``-1``: none) of the KV head's
    ``out_rows_ref [R, Dv']`` and ``lse_rows_ref [R]`` (the same buffers as ``_out_rows`` and
    ``_lse_rows``, which are not read)."""
    block = _QueryBlock(geo, queries)
    q = load_pieces(q_ref, slice(None), geo.dk, block.in_range)

    def forced(candidate, state):
        count, valid, k, v = block.forced_block(candidate, counts_ref, k_ref, v_ref)
        # A block on c of the query's slots is c copies of its keys in the reference's softmax.
        bias = jnp.log2(jnp.maximum(count, 1).astype(jnp.float32))
        return online_softmax_step(
            state, q, k, v, valid, geo.log2_scale, geo.precision, flush=geo.flush_exp2, bias=bias
        )

    # A loop over the candidates, not three unrolled blocks: unrolled, the dQ kernel took 255
    # registers and spilled 128 bytes at Dk = 192; as loops they take 240 and 168 without spills
    # (experiments/kernel_resources.py: triton 3.6, ptxas for sm_90a, 4 warps, 2 stages).
    acc, row_max, row_sum = jax.lax.fori_loop(
        0, _CANDIDATES, forced, empty_softmax_state(queries, geo.dv_padded)
    )
    seen = row_sum > 0
    row = plt.load(row_ref, mask=block.in_range, other=-1)
    live = block.in_range & (row >= 0)
    at = jnp.maximum(row, 0) * geo.group + block.group_head
    columns = jnp.arange(geo.dv_padded)
    out = acc / jnp.where(seen, row_sum, 1.0)[:, None]
    cells = live[:, None] & (columns < geo.dv)[None, :]
    plt.store(out_rows_ref.at[at[:, None], columns[None, :]], out.astype(out_rows_ref.dtype), mask=cells)
    lse = jnp.where(seen, row_max + jnp.log2(jnp.where(seen, row_sum, 1.0)), MASKED)
    plt.store(lse_rows_ref.at[at], lse, mask=live)


def _dq_kernel(counts_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dq_ref, *, geo, queries):
    """The forced blocks' dQ of one block of ``Q`` queries and one query head (``dq_ref [Q, Dk']``,
    scaled): their ``dS K`` from ``q_ref [Q, Dk']``, ``do_ref [Q, Dv']``, ``lse_ref``/``delta_ref
    [Q]`` and the blocks of ``k_ref``/``v_ref``."""
    block = _QueryBlock(geo, queries)
    in_range = block.in_range
    q = load_pieces(q_ref, slice(None), geo.dk, in_range)
    do = load(do_ref, tile_mask(in_range, lanes(geo.dv, geo.dv_padded)))
    lse = plt.load(lse_ref, mask=in_range, other=0)
    delta = plt.load(delta_ref, mask=in_range, other=0)
    pieces = column_pieces(geo.dk)

    def forced(candidate, dq):
        count, valid, k, v = block.forced_block(candidate, counts_ref, k_ref, v_ref)
        scores = dot_nt_pieces(q, k, geo.precision)
        p = jnp.where(valid, exp2_affine(scores, geo.log2_scale, lse, flush=geo.flush_exp2), 0.0)
        # Each of the c copies of a block in the query's slots has this P and adds this dS K.
        ds = p * (dot_nt(do, v, geo.precision) - delta[:, None]) * count.astype(jnp.float32)[:, None]
        return [
            acc + dot(ds.astype(piece.dtype), piece, geo.precision) for acc, piece in zip(dq, k, strict=True)
        ]

    dq = [jnp.zeros((queries, width), jnp.float32) for _, width in pieces]
    dq = jax.lax.fori_loop(0, _CANDIDATES, forced, dq)
    for (offset, width), acc in zip(pieces, dq, strict=True):
        store(
            dq_ref.at[:, pl.ds(offset, width)],
            acc * geo.scale,
            tile_mask(in_range, lanes(min(geo.dk - offset, width), width)),
        )


class _Specs:
    """Block specs of the grid ``(HQ, ceil(T / merge_queries), B)``: one program per block of
    ``merge_queries`` queries, query head and batch row."""

    def __init__(self, geo, length: int):
        self.queries, self.group, self.length = geo.tuning.merge_queries, geo.group, length
        if geo.block_size % self.queries:
            raise ValueError(f"merge_queries must divide the block size {geo.block_size}, got {self.queries}")

    def _spec(self, shape, index, tail) -> pl.BlockSpec:
        return pl.BlockSpec((*shape, *tail), lambda h, g, b: (*index(h, g, b), *(0,) * len(tail)))

    def per_query_head(self, *tail: int) -> pl.BlockSpec:
        """The program's queries of ``[B, T, HQ, *tail]``."""
        return self._spec((None, self.queries, None), lambda h, g, b: (b, g, h), tail)

    def per_kv_head(self, *tail: int) -> pl.BlockSpec:
        """The program's queries of ``[B, T, H, *tail]`` at its query head's KV head."""
        return self._spec(
            (None, self.queries, None), lambda h, g, b: (b, g, jax.lax.div(h, self.group)), tail
        )

    def kv_head_rows(self, num_rows: int, *tail: int) -> pl.BlockSpec:
        """All ``num_rows`` rows of ``[B, H, R, *tail]`` at the program's KV head."""
        return self._spec((None, None, num_rows), lambda h, g, b: (b, jax.lax.div(h, self.group), 0), tail)

    def whole_kv_head(self, *tail: int) -> pl.BlockSpec:
        """All of ``[B, T, H, *tail]`` at the program's KV head."""
        return self._spec((None, self.length, None), lambda h, g, b: (b, 0, jax.lax.div(h, self.group)), tail)


def _call(
    kernel, name: str, geo, forced: tuple, inputs: list, out_shapes: list,
    rows: tuple = (), per_kv: tuple = (),
):  # fmt: skip
    """``kernel`` over the grid ``(HQ, ceil(T / merge_queries), B)``: its refs are the forced
    inputs ``(counts, k, v)`` (:func:`forced_pairs`' counts; the whole K and V of the program's KV
    head), then ``inputs`` (``[B, T, HQ, ...]``, the program's queries and head), then ``per_kv``
    (``[B, T, H, ...]``, the program's queries at its KV head), then ``rows`` (``[B, H, R, ...]``,
    all rows of its KV head, updated in place), then its outputs: the rows' new values, then
    ``out_shapes`` (``[B, T, HQ, ...]`` as the inputs)."""
    batch, length = forced[0].shape[:2]
    q_heads = geo.group * forced[0].shape[2]
    specs = _Specs(geo, length)
    forced_specs = [
        specs.per_kv_head(_COUNT_LANES),
        specs.whole_kv_head(geo.dk_padded),
        specs.whole_kv_head(geo.dv_padded),
    ]
    per_query = lambda x: specs.per_query_head(*(padded(d) for d in x.shape[3:]))
    per_row = lambda x: specs.kv_head_rows(x.shape[2], *(padded(d) for d in x.shape[3:]))
    by_kv_head = lambda x: specs.per_kv_head(*(padded(d) for d in x.shape[3:]))
    in_specs = [*forced_specs, *map(per_query, inputs), *map(by_kv_head, per_kv), *map(per_row, rows)]
    first_row = len(in_specs) - len(rows)
    return pl.pallas_call(
        functools.partial(kernel, geo=geo, queries=specs.queries),
        grid=(q_heads, pl.cdiv(length, specs.queries), batch),
        in_specs=in_specs,
        out_specs=[per_row(x) for x in rows] + [per_query(x) for x in out_shapes],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in rows] + list(out_shapes),
        input_output_aliases={first_row + i: i for i in range(len(rows))},
        compiler_params=geo.params(geo.tuning.merge_warps, geo.tuning.merge_stages),
        interpret=geo.interpret,
        name=name,
    )(*forced, *inputs, *per_kv, *rows)


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
        a power of two dividing ``l'``), ``merge_warps`` and ``merge_stages``.

    Returns:
      ``(out_rows, lse_rows)`` with the forced partials written.
    """
    name = "nsa_selected_fwd_forced"
    rows = (out_rows, lse_rows)
    return _call(_forced_kernel, name, geo, (counts, k, v), [q], [], rows=rows, per_kv=(forced_rows,))


def forced_dq(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dout: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    counts: jax.Array,
    geo,
) -> jax.Array:
    """The forced blocks' part of selected attention's dQ (Eq. 11), one row a query and query head.

    Args:
      q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; dout: ``[B, T, HQ, Dv]``.
      lse, delta: float32 ``[B, T, H, G]`` (the forward's base-2 log-sum-exp; ``rowsum(out * dout)``).
      counts: ``[B, T, H, 4]`` from :func:`forced_pairs`.
      geo: as for :func:`attend_forced`.

    Returns:
      ``[B, T, H, G, Dk]`` in ``q.dtype`` (scaled), to add to the other pairs' summed dQ rows.
    """
    batch, length, q_heads, _ = q.shape
    by_query_head = lambda x: x.reshape(batch, length, q_heads)
    inputs = [q, dout, by_query_head(lse), by_query_head(delta)]
    out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    [dq] = _call(_dq_kernel, "nsa_selected_bwd_forced_dq", geo, (counts, k, v), inputs, out_shapes)
    return dq.reshape(batch, length, k.shape[2], geo.group, geo.dk)
