"""Selected attention (spec, "Selected attention (Eq. 12)") as Pallas kernels, Triton lowering.

Layouts follow :func:`nsa_jax.selected_attention`: ``q [B, T, HQ, Dk]``,
``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``HQ = H * G``. Internally ``q`` is viewed
as ``[B, T, H, G, Dk]`` so that one program loads the ``G`` query heads of a KV head
as one tile (spec, "Kernel design": group-centric loading).

Kernels:

- forward, grid ``(T, H, B)``: one query position and one KV head per program;
  streams the ``n`` selected key blocks with an online softmax in float32 and saves
  the log-sum-exp (base 2) for the backward. Consecutive programs share a KV head,
  so the blocks they read stay in L2. ``Dk`` goes in power-of-two column pieces
  (192 = 128 + 64, their dots summed): one 256-lane tile took 23.3 ms at T = 64K,
  Dk = 192 / Dv = 128 against 20.0 ms (experiments/results/layer_session13_h200.md).
  With ``SelectionTuning.fwd_queries = Q > 1`` (the default at Dk = 192 / Dv = 128,
  ``Q = 2``), grid ``(ceil(T / Q), H, B)``: a program takes ``Q`` consecutive positions,
  reads each block that all of them select once for all (the forced initial and local
  blocks at least; :mod:`pallas_kernels.gpu.shared_blocks` splits the lists in XLA
  first), then each position's other blocks in a loop of its own.
- forward keys to queries (``SelectionTuning.mosaic_forward``, the default where the Mosaic
  tile kernel below serves the shape): one Mosaic GPU program per key tile gathers the query
  rows that picked it and writes partial outputs that XLA merges
  (:mod:`pallas_kernels.gpu.selection_forward_mosaic`); it builds the inverse map, which the
  backward then reuses.
- backward, grid ``(ceil(T / l'), H, B)``: one key tile per program, looping over
  the (query, slot) pairs that selected it, listed by
  :func:`pallas_kernels.gpu.inverse_map.build_inverse_map`, several pairs per step
  (their query rows gathered into one tile). It recomputes ``P`` from the
  log-sum-exp, accumulates dK and dV of the tile, and emits each pair's dQ
  contribution. ``O(T * n)`` work, no scan over all queries.

The backward runs as four stages: ``delta = rowsum(out * dout)`` (XLA), the inverse
map (XLA sort), the tile kernel, and the dQ reduction. Variants, chosen by
:class:`pallas_kernels.gpu.block_sizes.SelectionTuning` (defaults per head dims in
``tuning_for``):

- dQ as parts (deterministic): each pair writes its dQ to its own (slot, part) row of
  ``[B, T, H, n*E, G, Dk]`` (bf16 for bf16 inputs), summed afterwards by XLA or
  (``dq_sum_kernel``) by a Pallas kernel that writes the input dtype directly; every
  output element has one writer. The Mosaic tile kernel writes the same rows in list
  order instead (one store a step) and the sum gathers them by list position.
- rows-major scores (``bwd_rows_major``): the score tile as ``[rows, keys]`` so that
  with 8 warps and 128 rows each of the two MMA warp groups gets 64 distinct rows.
- transposed dQ (``dq_transposed``): a step's dQ as ``[Dk, rows] = K^T dS^T``, whose
  MMA has the head dim (not 32 rows) as first dimension.
- split head dims (``split_head_dims``): Dk = 192 held as 128 + 64 column tiles
  instead of one 256-wide tile, which cuts the dK accumulator and the gathered
  tiles by a quarter.
- heavy first (``bwd_heavy_first``): programs launched in descending order of their
  list length with the KV heads interleaved. Early key tiles are selected by many
  more queries (about 5x the mean at 64K with random causal selections, and every
  query when the first block is always selected), so in tile order the last head's
  long lists start late and make the kernel's tail.
- Mosaic GPU tile kernel (``mosaic_backward``, the default at Dk = Dv = 128 and at
  Dk = 192 / Dv = 128): the same tile kernel in Pallas Mosaic GPU
  (:mod:`pallas_kernels.gpu.selection_mosaic`: TMA gathers by a memory warpgroup, warpgroup
  MMAs) for bf16, unpacked, ``G = 16``, ``l' = 64`` on Hopper, with its own split count
  (``mosaic_splits``).
- splits (``bwd_splits``): several programs per key tile, each on an equal share of
  its list, with float32 partial dK/dV summed afterwards. The spec's selection
  always keeps block 0 (Eq. 11), whose tile is then listed by all T queries: one
  program would take about 4x the balanced kernel time (a list-scheduling model at
  64K with 264 resident programs), whatever the launch order.

Why these, at the benchmark shape (T = 64K, B = 1, H = 4, G = 16, n = 16, l' = 64,
D = 128, bf16; P = T*H*n = 4.2M (query, slot) pairs of G rows):

- The tile kernel gathers q and dout rows per pair: P*G*(Dk+Dv)*2 B = 34 GB, and
  does 5 matmuls of 2*HQ*T*n*l'*D = 1.1 TFLOP each (5.5 TFLOP).
- dQ parts: 17 GB written by the kernel, 17 GB read by the sum (~8 ms of HBM time;
  the XLA sum measured 4.8 ms alone).
- Rejected after measuring: dQ by float32 atomics into one ``[B, T+1, H, G', Dk']``
  buffer (no parts, not deterministic): fwd+bwd 113.3 and 97.0 ms against 65.5 and
  48.6 ms with parts at the same launch parameters (Dk=192: 213.1 against 124.7 ms;
  experiments/results/selection_sweep_h200.md): the float32 reductions in L2 cost more
  than the parts' HBM round trip. A single-key uint32 sort for the inverse map: 1.46
  against 1.50 ms (the flat sort of session 10 over all rows at once takes 0.7-0.9).
- Rejected: a query-centric dQ pass recomputing P (reads every selected K and V
  block again through L2, 137 GB, as the 16 ms forward does), and writing the
  score gradient ``dS [P, G, l']`` instead of dQ parts (8.6 GB + 8.6 GB, but the
  dS @ K pass again reads 69 GB of K blocks through L2: ~8 ms, more than it saves).

Registers per thread / stack bytes (spills) / shared memory of the backward for
sm_90a at T = 64K, G = 16, l' = 64 (``experiments/kernel_resources.py``; every
variant of ``experiments/selection_inputs.VARIANTS`` is listed in
experiments/results/selection_h200.md): the D=128 Triton tuning (4 warps, 3 stages, 32
rows, keys-major) 255 / 232 B / 87 KB, yet the fastest Triton variant measured; the
Dk=192/Dv=128 Triton tuning (8 warps, 2 stages, 64 rows, rows-major, split) 255 / 232 B /
140 KB. Four
warps cannot hold the float32 dK and dV accumulators of a 64-key tile (128 registers
at D = 128) next to the step's tiles without spilling.

Tiles are padded to what ``tl.dot`` accepts (rows ``G`` and the block size to
``max(16, next_pow2)``, head dims to powers of two or, in the backward, to
power-of-two column tiles) with masked loads and stores, so any ``G``,
``Dk != Dv``, any ``T`` and any block size are served.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from nsa_jax.segments import segment_starts
from pallas_kernels.gpu import forced_merge, selection_forward_mosaic, selection_mosaic, shared_blocks
from pallas_kernels.gpu.block_sizes import SelectionTuning, tuning_for
from pallas_kernels.gpu.inverse_map import build_inverse_map, key_tile_count, listed_parts, parts_per_slot
from pallas_kernels.gpu.tiles import (
    LOG2E,
    column_pieces,
    dot,
    dot_nt,
    empty_softmax_state,
    lanes,
    load,
    load_pieces,
    online_softmax_step,
    padded,
    per_query_block,
    require_supported_dtype,
    store,
    tile_mask,
)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shape facts shared by the two kernels (hashable: a custom_vjp nondiff arg)."""

    length: int
    block_size: int
    slots: int
    group: int
    dk: int
    dv: int
    scale: float
    aligned: bool
    dtype: str
    interpret: bool
    tuning: SelectionTuning

    @property
    def rows(self) -> int:
        return padded(self.group)

    @property
    def tile(self) -> int:
        return padded(self.block_size)

    @property
    def dk_padded(self) -> int:
        return padded(self.dk)

    @property
    def dv_padded(self) -> int:
        return padded(self.dv)

    @property
    def heads_pow2(self) -> int:
        """``next_pow2(G)``: rows one (query, slot) pair takes in a backward step."""
        return pl.next_power_of_2(self.group)

    @property
    def bwd_rows(self) -> int:
        return max(16, self.tuning.bwd_rows, self.heads_pow2)

    @property
    def parts(self) -> int:
        return parts_per_slot(self.aligned)

    @property
    def precision(self) -> jax.lax.Precision | None:
        """Full float32 dots for float32 inputs (the Triton default would be TF32)."""
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None

    @property
    def flush_exp2(self) -> bool:
        """The forward's exps as one fma and ex2.approx.ftz (:func:`tiles.exp2_affine`) on the GPU:
        15.3 against 15.6-15.9 ms at T = 64K, Dk = 128, 18.7-18.9 against 19.4-19.5 at Dk = 192
        (experiments/results/select_blocks_session16_h200.md)."""
        return not self.interpret

    @property
    def log2_scale(self) -> float:
        """The logit scale in base-2 units (the kernels use ``exp2``)."""
        return self.scale * LOG2E

    @property
    def key_rows_may_overrun(self) -> bool:
        """Whether a selected tile can reach past ``T`` or past its block."""
        return not (self.aligned and self.length % self.block_size == 0 and self.tile == self.block_size)

    def column_chunks(self, size: int) -> tuple[tuple[int, int], ...]:
        """``(first lane, width)`` tiles covering a head dim of ``size`` in the backward:
        :func:`column_pieces` with ``tuning.split_head_dims``, else one tile of
        ``padded(size)`` lanes (192 -> 256)."""
        if not self.tuning.split_head_dims:
            return ((0, padded(size)),)
        return column_pieces(size)

    def params(self, warps: int, stages: int) -> plt.CompilerParams:
        return plt.CompilerParams(num_warps=warps, num_stages=stages)


def _dot_tn(a: jax.Array, b: jax.Array, precision: jax.lax.Precision | None) -> jax.Array:
    """``a.T @ b`` accumulated in float32."""
    dims = (((0,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _selected_keys(geo: _Geometry, start: jax.Array, query: jax.Array):
    """Rows of the key tile read for a selected block starting at ``start`` (-1: none).

    Returns ``(row_slice, valid [tile], load_rows [tile] or None)``: ``valid`` marks
    keys that the query attends to, ``load_rows`` the rows that may be read.
    """
    offsets = jnp.arange(geo.tile)
    first = jnp.maximum(start, 0)
    positions = first + offsets
    valid = (start >= 0) & (positions <= query)
    load_rows = None
    if geo.key_rows_may_overrun:
        load_rows = (positions < geo.length) & (offsets < geo.block_size)
        valid = valid & (offsets < geo.block_size)
    return pl.ds(first, geo.tile), valid, load_rows


def _read_block(geo: _Geometry, k_ref, v_ref, rows, load_rows):
    """The key tile (in :func:`load_pieces`) and value tile of a selected block."""
    k = load_pieces(k_ref, rows, geo.dk, load_rows)
    v = load(v_ref.at[rows, :], tile_mask(load_rows, lanes(geo.dv, geo.dv_padded)))
    return k, v


def _write_query(geo: _Geometry, state, o_ref, lse_ref) -> None:
    """Normalised output ``o_ref [rows, Dv']`` and log-sum-exp ``lse_ref [rows]`` (base 2)."""
    acc, row_max, row_sum = state
    seen = row_sum > 0
    out = acc / jnp.where(seen, row_sum, 1.0)[:, None]
    store(o_ref, out, tile_mask(lanes(geo.group, geo.rows), lanes(geo.dv, geo.dv_padded)))
    lse_ref[...] = jnp.where(seen, row_max + jnp.log2(jnp.where(seen, row_sum, 1.0)), 0.0)


def _forward_kernel(starts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, geo: _Geometry):
    """One query position ``t`` and one KV head: ``q_ref [rows, Dk']``, ``k_ref [T, Dk']``.

    ``Dk`` is held in power-of-two column pieces (:func:`column_pieces`, 192 = 128 + 64) whose
    dots are summed, so no lane is loaded or multiplied for the padding to ``Dk'``."""
    query = pl.program_id(0)
    q = load_pieces(q_ref, slice(None), geo.dk, lanes(geo.group, geo.rows))

    def body(slot, carry):
        rows, valid, load_rows = _selected_keys(geo, starts_ref[slot], query)
        k, v = _read_block(geo, k_ref, v_ref, rows, load_rows)
        return online_softmax_step(carry, q, k, v, valid, geo.log2_scale, geo.precision, flush=geo.flush_exp2)

    state = jax.lax.fori_loop(0, geo.slots, body, empty_softmax_state(geo.rows, geo.dv_padded))
    _write_query(geo, state, o_ref, lse_ref)


def _group_forward_kernel(
    shared_ref, shared_count_ref, private_ref, private_count_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, geo
):
    """``Q = fwd_queries`` consecutive query positions and one KV head: ``q_ref [Q, rows, Dk']``,
    ``k_ref [T, Dk']``; ``shared_ref [n]`` (``shared_count_ref []`` of them) are the blocks every
    position selects, read once and attended by each, then position ``i`` reads its
    ``private_ref [i, :private_count_ref[i]]`` alone (:mod:`pallas_kernels.gpu.shared_blocks`).
    Positions past ``T`` select nothing; their loads and stores are masked."""
    queries = geo.tuning.fwd_queries
    first = pl.program_id(0) * queries
    head_rows = lanes(geo.group, geo.rows)
    # Positions index the refs as jnp.int32: interpret mode cannot discharge a store through
    # ``ref.at[python int]`` (jax 0.12), and the Triton lowering takes either.
    qs = [load_pieces(q_ref, slice(None), geo.dk, head_rows, lead=(jnp.int32(i),)) for i in range(queries)]

    def shared_body(slot, states):
        start = shared_ref[slot]
        rows, _, load_rows = _selected_keys(geo, start, first)
        k, v = _read_block(geo, k_ref, v_ref, rows, load_rows)
        return tuple(
            online_softmax_step(
                state,
                q,
                k,
                v,
                _selected_keys(geo, start, first + i)[1],
                geo.log2_scale,
                geo.precision,
                flush=geo.flush_exp2,
            )
            for i, (state, q) in enumerate(zip(states, qs, strict=True))
        )

    shared_count = shared_count_ref[...]
    states = jax.lax.fori_loop(
        0, shared_count, shared_body, (empty_softmax_state(geo.rows, geo.dv_padded),) * queries
    )
    # One loop per position: the H200 ran these faster than one loop taking a block of every
    # position a step (experiments/results/layer_session14_h200.md).
    for i, (state, q) in enumerate(zip(states, qs, strict=True)):

        def private_body(slot, carry, i=i, q=q):
            rows, valid, load_rows = _selected_keys(geo, private_ref[i, slot], first + i)
            k, v = _read_block(geo, k_ref, v_ref, rows, load_rows)
            return online_softmax_step(
                carry, q, k, v, valid, geo.log2_scale, geo.precision, flush=geo.flush_exp2
            )

        state = jax.lax.fori_loop(0, private_count_ref[i], private_body, state)
        _write_query(geo, state, o_ref.at[jnp.int32(i)], lse_ref.at[jnp.int32(i)])


def _backward_kernel(
    entries_ref,
    offsets_ref,
    order_ref,
    starts_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dq_ref,
    geo: _Geometry,
):
    """dK, dV of key tile ``a`` (keys ``[a*l', (a+1)*l')``) of one KV head, and dQ.

    Refs hold the whole row of this (batch, KV head): ``q_ref [T, Gq, Dk']``,
    ``k_ref [T, Dk']``, ``do_ref [T, Gq, Dv']``, ``starts_ref [T, n]``,
    ``lse_ref``/``delta_ref [T, Gq]``; ``entries_ref``/``offsets_ref`` are this
    head's inverse map, ``order_ref [num_tiles]`` the tile of each program rank.
    Outputs: ``dk_ref [T, Dk']``, ``dv_ref [T, Dv']`` and ``dq_ref
    [T, n*E, Gq, Dk']``: parts, one writer per element, summed afterwards. Each step
    gathers ``bwd_rows`` rows: ``bwd_rows / Gq`` (query, slot) pairs
    times their ``Gq`` heads.
    """
    splits = geo.tuning.bwd_splits
    rank = pl.program_id(_rank_axis(geo))
    tile_index = order_ref[jax.lax.div(rank, splits)]
    dk_chunks, dv_chunks = geo.column_chunks(geo.dk), geo.column_chunks(geo.dv)
    offsets = jnp.arange(geo.tile)
    positions = tile_index * geo.block_size + offsets
    in_tile = None
    if geo.key_rows_may_overrun:
        in_tile = (positions < geo.length) & (offsets < geo.block_size)
    rows = pl.ds(tile_index * geo.block_size, geo.tile)
    k = [
        load(k_ref.at[rows, pl.ds(c, w)], tile_mask(in_tile, lanes(min(geo.dk - c, w), w)))
        for c, w in dk_chunks
    ]
    v = [
        load(v_ref.at[rows, pl.ds(c, w)], tile_mask(in_tile, lanes(min(geo.dv - c, w), w)))
        for c, w in dv_chunks
    ]
    log2_scale = geo.scale * LOG2E
    row = jnp.arange(geo.bwd_rows)
    pair, head = row // geo.heads_pow2, row % geo.heads_pow2
    first, last = offsets_ref[tile_index], offsets_ref[tile_index + 1]
    pairs = geo.bwd_rows // geo.heads_pow2
    if splits > 1:  # this program's share of the tile's list, whole steps of ``pairs``
        split = jax.lax.rem(rank, splits)
        share = jax.lax.div(last - first + splits * pairs - 1, splits * pairs) * pairs
        first = jnp.minimum(first + split * share, last)
        last = jnp.minimum(first + share, last)

    def gather(ref, query, live, chunk, size):
        cols = chunk[0] + jnp.arange(chunk[1])
        mask = live[:, None] & (cols < size)[None, :]
        return plt.load(ref.at[query[:, None], head[:, None], cols[None, :]], mask=mask, other=0)

    def body(step, carry):
        dk, dv = carry
        entry = first + step * pairs + pair
        live = entry < last
        ident = entries_ref[jnp.where(live, entry, first)]
        query = jax.lax.div(ident, geo.slots * geo.parts)
        part_slot = ident - query * (geo.slots * geo.parts)
        slot = jax.lax.div(part_slot, geo.parts)
        start = starts_ref[query, slot]
        live = live & (head < geo.group)
        q = [gather(q_ref, query, live, chunk, geo.dk) for chunk in dk_chunks]
        do = [gather(do_ref, query, live, chunk, geo.dv) for chunk in dv_chunks]
        lse = plt.load(lse_ref.at[query, head], mask=live, other=0)
        delta = plt.load(delta_ref.at[query, head], mask=live, other=0)
        # valid[r, c]: row r of the gathered tile attends to key c of this tile.
        valid = live[:, None] & (positions[None, :] <= query[:, None])
        if not geo.aligned:
            valid = (
                valid
                & (positions[None, :] >= start[:, None])
                & (positions[None, :] < start[:, None] + geo.block_size)
            )
        if in_tile is not None:
            valid = valid & in_tile[None, :]
        precision = geo.precision
        if geo.tuning.bwd_rows_major:  # scores [rows, keys]
            s = sum(dot_nt(qc, kc, precision) for qc, kc in zip(q, k, strict=True)) * log2_scale
            p = jnp.where(valid, jnp.exp2(s - lse[:, None]), 0.0)
            dv = [acc + _dot_tn(p.astype(dc.dtype), dc, precision) for acc, dc in zip(dv, do, strict=True)]
            dp = sum(dot_nt(dc, vc, precision) for dc, vc in zip(do, v, strict=True))
            ds = p * (dp - delta[:, None])
            dk = [acc + _dot_tn(ds.astype(qc.dtype), qc, precision) for acc, qc in zip(dk, q, strict=True)]
        else:  # scores [keys, rows]
            s = sum(dot_nt(kc, qc, precision) for qc, kc in zip(q, k, strict=True)) * log2_scale
            p = jnp.where(valid.T, jnp.exp2(s - lse[None, :]), 0.0)
            dv = [acc + dot(p.astype(dc.dtype), dc, precision) for acc, dc in zip(dv, do, strict=True)]
            dp = sum(dot_nt(vc, dc, precision) for dc, vc in zip(do, v, strict=True))
            ds = p * (dp - delta[None, :])
            dk = [acc + dot(ds.astype(qc.dtype), qc, precision) for acc, qc in zip(dk, q, strict=True)]
        # dQ [rows, w] = dS K, or [w, rows] = K^T dS^T: contract the keys axis of both.
        keys_axis = 1 if geo.tuning.bwd_rows_major else 0
        dims = (
            (((0,), (keys_axis,)), ((), ())) if geo.tuning.dq_transposed else (((keys_axis,), (0,)), ((), ()))
        )
        operands = lambda kc: (
            (kc, ds.astype(kc.dtype)) if geo.tuning.dq_transposed else (ds.astype(kc.dtype), kc)
        )
        dq = [
            jax.lax.dot_general(*operands(kc), dims, preferred_element_type=jnp.float32, precision=precision)
            for kc in k
        ]
        # Index grids shaped like a dQ chunk: per row along axis 0, or along axis 1 if transposed.
        by_row, by_col = (1, 0) if geo.tuning.dq_transposed else (0, 1)
        along = lambda x, axis: jnp.expand_dims(x, 1 - axis)
        # Dead rows point past the end: masked on GPU, dropped in interpret mode.
        target = along(jnp.where(live, query, geo.length), by_row)
        for (c, w), dq_chunk in zip(dk_chunks, dq, strict=True):
            cols = along(c + jnp.arange(w), by_col)
            dq_mask = along(live, by_row) & (cols < geo.dk)
            plt.store(
                dq_ref.at[target, along(part_slot, by_row), along(head, by_row), cols],
                (dq_chunk * geo.scale).astype(dq_ref.dtype),
                mask=dq_mask,
            )
        return dk, dv

    init = (
        [jnp.zeros((geo.tile, w), jnp.float32) for _, w in dk_chunks],
        [jnp.zeros((geo.tile, w), jnp.float32) for _, w in dv_chunks],
    )
    steps = jax.lax.div(last - first + pairs - 1, pairs)
    dk, dv = jax.lax.fori_loop(0, steps, body, init)
    # With splits, each program writes its float32 partial sums to its own split row.
    at = (
        (lambda ref, c, w: ref.at[rows, split, pl.ds(c, w)])
        if splits > 1
        else (lambda ref, c, w: ref.at[rows, pl.ds(c, w)])
    )
    for (c, w), acc in zip(dk_chunks, dk, strict=True):
        store(at(dk_ref, c, w), acc * geo.scale, tile_mask(in_tile, lanes(min(geo.dk - c, w), w)))
    for (c, w), acc in zip(dv_chunks, dv, strict=True):
        store(at(dv_ref, c, w), acc, tile_mask(in_tile, lanes(min(geo.dv - c, w), w)))


def _per_head(geo: _Geometry, *trailing: int, head_axis: int = 1) -> pl.BlockSpec:
    """Block of a whole row ``[T, ...]`` of one KV head; the head is grid axis ``head_axis``, batch axis 2."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec(
        (None, geo.length, None, *trailing), lambda x, y, b: (b, 0, (x, y)[head_axis], *zeros)
    )


def _rank_axis(geo: _Geometry) -> int:
    """Grid axis of the backward's tile rank: ``(rank, H, B)``, or ``(H, rank, B)`` heavy first.

    Blocks launch in order of the first axis fastest, so heavy first interleaves the heads.
    """
    return 1 if geo.tuning.bwd_heavy_first else 0


def _tile_order(offsets: jax.Array, geo: _Geometry, firsts: jax.Array | None = None) -> jax.Array:
    """int32 ``[B, H, num_tiles]``: the key tile of each tile-kernel program rank.

    Heavy first: descending (query, slot) count from ``firsts`` (default: the lists' starts) to
    the lists' ends (the longest lists start first, as in longest-processing-time scheduling);
    otherwise ascending tiles.
    """
    if not geo.tuning.bwd_heavy_first:
        return jnp.broadcast_to(jnp.arange(offsets.shape[-1] - 1, dtype=jnp.int32), offsets[..., 1:].shape)
    counts = offsets[..., 1:] - (offsets[..., :-1] if firsts is None else firsts)
    return jnp.argsort(-counts, axis=-1, stable=True).astype(jnp.int32)


def _forward(q, k, v, key_starts, geo: _Geometry):
    """``(out [B, T, HQ, Dv], lse [B, T, H, rows], inverse map or None)``: one program per query
    position and KV head, or per ``fwd_queries`` positions (:func:`_group_forward_kernel`), or
    keys to queries in Mosaic GPU (:func:`_mosaic_forward`, which returns the map it built)."""
    if _uses_mosaic(geo) and geo.tuning.mosaic_forward:
        return _mosaic_forward(q, k, v, key_starts, geo)
    batch, length, heads, _ = k.shape
    q5 = q.reshape(batch, length, heads, geo.group, geo.dk)
    queries = geo.tuning.fwd_queries
    if queries == 1:
        kernel, starts = _forward_kernel, [key_starts]
        in_specs = [per_query_block(geo.slots)]
    else:
        kernel = _group_forward_kernel
        shared, private = shared_blocks.split_shared_starts(key_starts, queries)
        starts = [shared, jnp.sum(shared >= 0, axis=-1), private, jnp.sum(private >= 0, axis=-1)]
        in_specs = [
            per_query_block(geo.slots),
            per_query_block(),
            _per_query_group(queries, geo.slots),
            _per_query_group(queries),
        ]
    out, lse = pl.pallas_call(
        functools.partial(kernel, geo=geo),
        grid=(-(-length // queries), heads, batch),
        in_specs=[
            *in_specs,
            _per_query_group(queries, geo.rows, geo.dk_padded),
            _per_head(geo, geo.dk_padded),
            _per_head(geo, geo.dv_padded),
        ],
        out_specs=[
            _per_query_group(queries, geo.rows, geo.dv_padded),
            _per_query_group(queries, geo.rows),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, geo.group, geo.dv), q.dtype),
            jax.ShapeDtypeStruct((batch, length, heads, geo.rows), jnp.float32),
        ],
        compiler_params=geo.params(geo.tuning.fwd_warps, geo.tuning.fwd_stages),
        interpret=geo.interpret,
        name="nsa_selected_fwd",
    )(*starts, q5, k, v)
    return out.reshape(batch, length, heads * geo.group, geo.dv), lse, None


def _mosaic_forward(q, k, v, key_starts, geo: _Geometry):
    """The forward keys to queries (:mod:`pallas_kernels.gpu.selection_forward_mosaic`): the
    inverse map, the tile kernel's partials, merged per query by XLA (with ``forced_merge``, the
    forced blocks' partial of :mod:`pallas_kernels.gpu.forced_merge` in place of theirs, written
    into the row of one of them)."""
    batch, length, heads, _ = k.shape
    tuning = geo.tuning
    entries, offsets = _inverse_map(key_starts, geo)
    listed = listed_parts(key_starts, block_size=geo.block_size, aligned=geo.aligned)
    positions = selection_mosaic.list_positions(entries, listed)
    firsts = None
    if tuning.forced_merge:
        # Which pairs select a forced block (Eq. 11), how many slots each candidate, and where each
        # tile's list starts past its forced prefix, in whole steps.
        forced, counts = forced_merge.forced_pairs(key_starts, geo.block_size)
        firsts = forced_merge.list_firsts(offsets, counts, geo.block_size, selection_mosaic.PAIRS)
    out_rows, lse_rows, rows = selection_forward_mosaic.tile_forward(
        q.reshape(batch, length, heads, geo.group, geo.dk),
        k,
        v,
        key_starts,
        entries,
        offsets,
        _tile_order(offsets, geo, firsts),
        positions,
        slots=geo.slots,
        scale=geo.scale,
        programs=_mosaic_programs(geo),
        stages=selection_forward_mosaic.stages_for(geo.dk, geo.dv, tuning.mosaic_fwd_stages),
        interpret=geo.interpret,
        firsts=firsts,
    )
    if firsts is not None:
        # One forced pair a query (its first row) takes the forced blocks' partial; the others
        # leave the merge.
        unused = jnp.iinfo(jnp.int32).max
        first = jnp.min(jnp.where(forced & (rows >= 0), rows, unused), axis=-1)
        forced_rows = jnp.where(first == unused, -1, first)
        rows = jnp.where(forced & (rows != forced_rows[..., None]), -1, rows)
        out_rows, lse_rows = forced_merge.attend_forced(q, k, v, counts, forced_rows, out_rows, lse_rows, geo)
    out, lse = selection_forward_mosaic.merge_partials(out_rows, lse_rows, rows)
    return out.reshape(batch, length, heads * geo.group, geo.dv), lse, (entries, offsets, positions)


def _per_query_group(queries: int, *trailing: int) -> pl.BlockSpec:
    """Block of ``queries`` consecutive positions of one KV head of a ``[B, T, H, ...]`` array,
    grid ``(ceil(T / queries), H, B)``; one position (the axis squeezed) when ``queries == 1``.
    A last group reaching past ``T`` is masked by the Triton lowering."""
    if queries == 1:
        return per_query_block(*trailing)
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((None, queries, None, *trailing), lambda g, h, b: (b, g, h, *zeros))


def _backward(q, k, v, key_starts, out, lse, dout, inverse, geo: _Geometry):
    """dq, dk, dv: the four stages below, each timed alone by experiments/bench_selection.py
    (the inverse map is the forward's where it built one)."""
    delta = _delta(out, dout, geo)
    if inverse is None:
        entries, offsets = _inverse_map(key_starts, geo)
        positions = None
    else:
        entries, offsets, positions = inverse
    dk, dv, dq = _tile_backward(q, k, v, dout, key_starts, lse, delta, entries, offsets, geo)
    dq = _finish_dq(dq, key_starts, entries, geo, positions)
    return dq.reshape(q.shape).astype(q.dtype), dk, dv


def _delta(out, dout, geo: _Geometry) -> jax.Array:
    """``rowsum(out * dout)`` in float32, ``[B, T, H, G]``."""
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    return delta.reshape(*out.shape[:2], -1, geo.group)


def _inverse_map(key_starts, geo: _Geometry) -> tuple[jax.Array, jax.Array]:
    return build_inverse_map(key_starts, block_size=geo.block_size, aligned=geo.aligned)


def _mosaic_programs(geo: _Geometry) -> selection_mosaic.Programs:
    """The Mosaic tile kernels' split of the key tiles' lists (both directions share it)."""
    tuning = geo.tuning
    return selection_mosaic.Programs(
        splits=tuning.mosaic_splits,
        heavy_first=tuning.bwd_heavy_first,
        heavy_tiles=tuning.mosaic_heavy_tiles,
        heavy_splits=tuning.mosaic_heavy_splits,
    )


def _uses_mosaic(geo: _Geometry) -> bool:
    return geo.tuning.mosaic_backward and selection_mosaic.supports(
        aligned=geo.aligned,
        group=geo.group,
        block_size=geo.block_size,
        dk=geo.dk,
        dv=geo.dv,
        dtype=geo.dtype,
        interpret=geo.interpret,
    )


def _tile_backward(q, k, v, dout, key_starts, lse, delta, entries, offsets, geo: _Geometry):
    """The backward kernel: dk, dv and dQ as parts ``[B, T, H, n*E, G, Dk]`` (Triton) or as
    rows in list order (Mosaic GPU, :func:`pallas_kernels.gpu.selection_mosaic.tile_backward`)."""
    batch, length, heads, _ = k.shape
    q5 = q.reshape(batch, length, heads, geo.group, geo.dk)
    do5 = dout.reshape(batch, length, heads, geo.group, geo.dv)
    if _uses_mosaic(geo):
        dk, dv, dq = selection_mosaic.tile_backward(
            q5,
            k,
            v,
            do5,
            lse,
            delta,
            entries,
            offsets,
            _tile_order(offsets, geo),
            slots=geo.slots,
            scale=geo.scale,
            programs=_mosaic_programs(geo),
            stages=selection_mosaic.stages_for(geo.dk, geo.dv, geo.tuning.bwd_stages),
            interpret=geo.interpret,
        )
        return dk.astype(k.dtype), dv.astype(v.dtype), dq
    num_tiles = key_tile_count(length, geo.block_size)
    head_axis = 1 - _rank_axis(geo)
    row = functools.partial(_per_head, geo, head_axis=head_axis)
    whole = lambda size: pl.BlockSpec((None, None, size), lambda x, y, b: (b, (x, y)[head_axis], 0))
    inputs = [entries, offsets, _tile_order(offsets, geo), key_starts, q5, k, v, do5, lse, delta]
    in_specs = [
        whole(entries.shape[-1]),
        whole(num_tiles + 1),
        whole(num_tiles),
        row(geo.slots),
        row(geo.heads_pow2, geo.dk_padded),
        row(geo.dk_padded),
        row(geo.dv_padded),
        row(geo.heads_pow2, geo.dv_padded),
        row(geo.heads_pow2),
        row(geo.heads_pow2),
    ]
    parts = (batch, length, heads, geo.slots * geo.parts, geo.group, geo.dk)
    dq_shape = jax.ShapeDtypeStruct(parts, jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32)
    dq_spec = row(geo.slots * geo.parts, geo.heads_pow2, geo.dk_padded)
    splits = geo.tuning.bwd_splits
    if splits > 1:  # float32 partial dK/dV per split, summed below
        kv_specs = [row(splits, geo.dk_padded), row(splits, geo.dv_padded)]
        kv_shapes = [
            jax.ShapeDtypeStruct((batch, length, heads, splits, d), jnp.float32) for d in (geo.dk, geo.dv)
        ]
    else:
        kv_specs = [row(geo.dk_padded), row(geo.dv_padded)]
        kv_shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    ranks = num_tiles * splits
    grid = (heads, ranks, batch) if geo.tuning.bwd_heavy_first else (ranks, heads, batch)
    dk, dv, dq = pl.pallas_call(
        functools.partial(_backward_kernel, geo=geo),
        grid=grid,
        in_specs=in_specs,
        out_specs=[*kv_specs, dq_spec],
        out_shape=[*kv_shapes, dq_shape],
        compiler_params=geo.params(geo.tuning.bwd_warps, geo.tuning.bwd_stages),
        interpret=geo.interpret,
        name="nsa_selected_bwd",
    )(*inputs)
    if splits > 1:
        dk, dv = _summed_splits(dk, dv, k, v)
    return dk, dv, dq


def _summed_splits(dk, dv, k, v) -> tuple[jax.Array, jax.Array]:
    """Float32 partials ``[B, T, H, splits, D]`` summed to dK, dV in the dtypes of ``k``, ``v``."""
    return jnp.sum(dk, axis=3).astype(k.dtype), jnp.sum(dv, axis=3).astype(v.dtype)


def _finish_dq(dq, key_starts, entries, geo: _Geometry, positions=None) -> jax.Array:
    """dQ ``[B, T, H, G, Dk]``: the tile kernel's listed parts (or list-ordered rows) summed.

    Float32, or already in the input dtype from the ``dq_sum_kernel`` reduction. ``positions``:
    the pairs' list positions where the forward computed them (Mosaic only).
    """
    listed = listed_parts(key_starts, block_size=geo.block_size, aligned=geo.aligned)
    if _uses_mosaic(geo):
        if positions is None:
            positions = selection_mosaic.list_positions(entries, listed)
        if geo.tuning.dq_sum_kernel:
            return _sum_dq_rows(dq, positions, geo)
        return selection_mosaic.sum_listed_rows(dq, positions)
    if geo.tuning.dq_sum_kernel:
        return _sum_dq_parts(dq, listed, geo)
    return jnp.sum(jnp.where(listed[..., None, None], dq.astype(jnp.float32), 0.0), axis=3)


def _summed_listed(listed, rows_of, dq_ref, geo: _Geometry) -> None:
    """dQ of one query and KV head: the ``[Gp, Dk']`` rows ``rows_of(part)`` of each part with
    ``listed(part)`` summed into ``dq_ref``.

    The other parts' rows hold whatever the buffer held and are never read (a fully masked
    load moves no bytes). The loop is unrolled so that the parts' loads are issued together.
    """
    cells = tile_mask(lanes(geo.group, geo.heads_pow2), lanes(geo.dk, geo.dk_padded))
    shape = (geo.heads_pow2, geo.dk_padded)
    acc = jnp.zeros(shape, jnp.float32)
    for part in range(geo.slots * geo.parts):
        # A traced index: interpret mode cannot discharge a masked load at a Python int.
        part = jnp.int32(part)
        keep = jnp.broadcast_to(listed(part), shape)
        mask = keep if cells is None else keep & cells
        acc += plt.load(rows_of(part), mask=mask, other=0).astype(jnp.float32)
    store(dq_ref, acc, cells)


def _dq_sum_kernel(listed_ref, parts_ref, dq_ref, *, geo: _Geometry):
    """``parts_ref [n*E, Gp, Dk']`` summed over the parts ``listed_ref [n*E]`` (int32) marks."""
    _summed_listed(lambda part: listed_ref[part] != 0, lambda part: parts_ref.at[part], dq_ref, geo)


def _dq_rows_sum_kernel(positions_ref, rows_ref, dq_ref, *, geo: _Geometry):
    """The Mosaic kernel's list-ordered rows ``rows_ref [R, Dk']`` of one KV head, summed over
    the query's pairs at list positions ``positions_ref [n]`` (``-1``: unlisted)."""

    def rows_of(part):
        first_row = jnp.maximum(positions_ref[part], 0) * geo.group
        return rows_ref.at[pl.ds(first_row, geo.heads_pow2)]

    _summed_listed(lambda part: positions_ref[part] >= 0, rows_of, dq_ref, geo)


def _sum_dq_parts(parts: jax.Array, listed: jax.Array, geo: _Geometry) -> jax.Array:
    """``parts [B, T, H, n*E, G, Dk]`` summed over listed parts, ``[B, T, H, G, Dk]`` in the input dtype."""
    spec = per_query_block(geo.slots * geo.parts, geo.heads_pow2, geo.dk_padded)
    return _dq_sum_call(_dq_sum_kernel, spec, listed.astype(jnp.int32), parts, geo)


def _sum_dq_rows(rows: jax.Array, positions: jax.Array, geo: _Geometry) -> jax.Array:
    """The Mosaic kernel's dQ rows ``[B, H, R, Dk]`` summed per query by list ``positions``
    ``[B, T, H, n]``: ``[B, T, H, G, Dk]`` in the input dtype."""
    spec = pl.BlockSpec((None, None, rows.shape[2], geo.dk_padded), lambda t, h, b: (b, h, 0, 0))
    return _dq_sum_call(_dq_rows_sum_kernel, spec, positions, rows, geo)


def _dq_sum_call(kernel, rows_spec: pl.BlockSpec, which: jax.Array, rows: jax.Array, geo: _Geometry):
    """One program per query and KV head: ``kernel(which_ref [n*E], rows_ref, dq_ref)``."""
    batch, length, heads = which.shape[:3]
    return pl.pallas_call(
        functools.partial(kernel, geo=geo),
        grid=(length, heads, batch),
        in_specs=[per_query_block(geo.slots * geo.parts), rows_spec],
        out_specs=per_query_block(geo.heads_pow2, geo.dk_padded),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, geo.group, geo.dk), jnp.dtype(geo.dtype)),
        compiler_params=geo.params(4, 1),
        interpret=geo.interpret,
        name="nsa_selected_dq_sum",
    )(which, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, key_starts, geo: _Geometry):
    return _forward(q, k, v, key_starts, geo)[0]


def _attention_fwd(q, k, v, key_starts, geo: _Geometry):
    out, lse, inverse = _forward(q, k, v, key_starts, geo)
    return out, (q, k, v, key_starts, out, lse, inverse)


def _attention_bwd(geo: _Geometry, residuals, dout):
    q, k, v, key_starts, out, lse, inverse = residuals
    dq, dk, dv = _backward(q, k, v, key_starts, out, lse, dout, inverse, geo)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def selected_key_starts(
    block_indices: jax.Array, segment_ids: jax.Array | None, block_size: int
) -> jax.Array:
    """Absolute first key of every selected block, ``-1`` where the slot sees nothing.

    Args:
      block_indices: int ``[B, T, H, n]``, blocks counted from the segment start.
      segment_ids: int ``[B, T]`` or ``None``.
      block_size: ``l'``.

    Returns:
      int32 ``[B, T, H, n]``: ``s0 + j * l'`` for a valid slot whose block starts at
      or before the query, else ``-1`` (unused slots and blocks wholly in the future).
    """
    batch, length = block_indices.shape[:2]
    s0 = segment_starts(segment_ids, batch, length)[:, :, None, None]
    indices = block_indices.astype(jnp.int32)
    starts = s0 + indices * block_size
    query = jnp.arange(length, dtype=jnp.int32)[None, :, None, None]
    return jnp.where((indices >= 0) & (starts <= query), starts, -1)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "interpret", "tuning"))
def selected_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    *,
    block_size: int,
    scale: float,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    tuning: SelectionTuning | None = None,
) -> jax.Array:
    """Selected attention with a Pallas forward and backward; see :func:`nsa_jax.selected_attention`.

    Args:
      q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; one float dtype.
      block_indices: int ``[B, T, H, n]``, ``-1`` for unused slots, any order.
      block_size: ``l'``; scale: logit scale; segment_ids: int ``[B, T]`` or ``None``.
      interpret: run the kernels in Pallas interpret mode (CPU).
      tuning: launch parameters and backward variant; ``None`` takes
        :func:`pallas_kernels.gpu.block_sizes.tuning_for` of the head dims.

    Returns:
      ``[B, T, HQ, Dv]`` in ``q.dtype``; differentiable in ``q``, ``k``, ``v``.
    """
    geo = _Geometry(
        length=q.shape[1],
        block_size=block_size,
        slots=block_indices.shape[-1],
        group=q.shape[2] // k.shape[2],
        dk=q.shape[3],
        dv=v.shape[3],
        scale=float(scale),
        aligned=segment_ids is None,
        dtype=jnp.dtype(q.dtype).name,
        interpret=interpret,
        tuning=tuning_for(q.shape[3], v.shape[3]) if tuning is None else tuning,
    )
    key_starts = selected_key_starts(block_indices, segment_ids, block_size)
    return _attention(q, k, v, key_starts, geo)


def check(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    *,
    block_size: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> None:
    """Raises ``ValueError`` for inputs these kernels do not serve (only non-float16/32 dtypes)."""
    del k, v, block_indices, block_size, scale, segment_ids
    require_supported_dtype(q)
