"""Selected attention (spec, "Selected attention (Eq. 12)") as Pallas kernels, Triton lowering.

Layouts follow :func:`nsa_jax.selected_attention`: ``q [B, T, HQ, Dk]``,
``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``HQ = H * G``. Internally ``q`` is viewed
as ``[B, T, H, G, Dk]`` so that one program loads the ``G`` query heads of a KV head
as one tile (spec, "Kernel design": group-centric loading).

Two kernels:

- forward, grid ``(T, H, B)``: one query position and one KV head per program;
  streams the ``n`` selected key blocks with an online softmax in float32 and saves
  the log-sum-exp (base 2) for the backward. Consecutive programs share a KV head,
  so the blocks they read stay in L2.
- backward, grid ``(ceil(T / l'), H, B)``: one key tile per program, looping over
  the (query, slot) pairs that selected it, listed by
  :func:`pallas_kernels.gpu.inverse_map.build_inverse_map`, several pairs per step
  (their query rows gathered into one tile). It recomputes ``P`` from the
  log-sum-exp, accumulates dK and dV of the tile, and writes each pair's dQ
  contribution to its own slot of a ``[B, T, H, n*E, G, Dk]`` buffer that is summed
  over slots afterwards. No atomics and no scan over all queries: ``O(T * n)`` work,
  every output element has one writer (deterministic).

Tiles are padded to what ``tl.dot`` accepts (rows ``G`` and the block size to
``max(16, next_pow2)``, head dims to powers of two) with masked loads and stores, so
any ``G``, ``Dk != Dv``, any ``T`` and any block size are served.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from nsa_jax.segments import segment_starts
from pallas_kernels.gpu.block_sizes import DEFAULT_TUNING, SelectionTuning
from pallas_kernels.gpu.inverse_map import build_inverse_map, key_tile_count, listed_parts, parts_per_slot
from pallas_kernels.gpu.tiles import (
    LOG2E,
    MASKED,
    dot,
    dot_nt,
    lanes,
    load,
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
    def key_rows_may_overrun(self) -> bool:
        """Whether a selected tile can reach past ``T`` or past its block."""
        return not (self.aligned and self.length % self.block_size == 0 and self.tile == self.block_size)

    def params(self, warps: int, stages: int) -> plt.CompilerParams:
        return plt.CompilerParams(num_warps=warps, num_stages=stages)


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


def _forward_kernel(starts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, geo: _Geometry):
    """One query position ``t`` and one KV head: ``q_ref [rows, Dk']``, ``k_ref [T, Dk']``."""
    query = pl.program_id(0)
    head_rows = lanes(geo.group, geo.rows)
    dk_cols, dv_cols = lanes(geo.dk, geo.dk_padded), lanes(geo.dv, geo.dv_padded)
    q = load(q_ref, tile_mask(head_rows, dk_cols))
    log2_scale = geo.scale * LOG2E

    def body(slot, carry):
        acc, row_max, row_sum = carry
        rows, valid, load_rows = _selected_keys(geo, starts_ref[slot], query)
        k = load(k_ref.at[rows, :], tile_mask(load_rows, dk_cols))
        v = load(v_ref.at[rows, :], tile_mask(load_rows, dv_cols))
        s = jnp.where(valid[None, :], dot_nt(q, k, geo.precision) * log2_scale, MASKED)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        p = jnp.where(valid[None, :], jnp.exp2(s - new_max[:, None]), 0.0)
        alpha = jnp.exp2(row_max - new_max)
        row_sum = row_sum * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, geo.precision)
        return acc, new_max, row_sum

    init = (
        jnp.zeros((geo.rows, geo.dv_padded), jnp.float32),
        jnp.full((geo.rows,), MASKED, jnp.float32),
        jnp.zeros((geo.rows,), jnp.float32),
    )
    acc, row_max, row_sum = jax.lax.fori_loop(0, geo.slots, body, init)
    seen = row_sum > 0
    out = acc / jnp.where(seen, row_sum, 1.0)[:, None]
    store(o_ref, out, tile_mask(head_rows, dv_cols))
    lse_ref[...] = jnp.where(seen, row_max + jnp.log2(jnp.where(seen, row_sum, 1.0)), 0.0)


def _backward_kernel(
    entries_ref,
    offsets_ref,
    starts_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dq_parts_ref,
    *,
    geo: _Geometry,
):
    """dK, dV of key tile ``a`` (keys ``[a*l', (a+1)*l')``) of one KV head, and dQ parts.

    Refs hold the whole row of this (batch, KV head): ``q_ref [T, Gq, Dk']``,
    ``k_ref [T, Dk']``, ``do_ref [T, Gq, Dv']``, ``starts_ref [T, n]``,
    ``lse_ref``/``delta_ref [T, Gq]``, ``dq_parts_ref [T, n*E, Gq, Dk']``;
    ``entries_ref``/``offsets_ref`` are this head's inverse map. Each step gathers
    ``bwd_rows`` rows: ``bwd_rows / Gq`` (query, slot) pairs times their ``Gq`` heads.
    The dQ contribution of each pair goes to its own (slot, part) row of
    ``dq_parts``, summed afterwards: every output element has one writer.
    """
    tile_index = pl.program_id(0)
    dk_cols, dv_cols = lanes(geo.dk, geo.dk_padded), lanes(geo.dv, geo.dv_padded)
    offsets = jnp.arange(geo.tile)
    positions = tile_index * geo.block_size + offsets
    in_tile = None
    if geo.key_rows_may_overrun:
        in_tile = (positions < geo.length) & (offsets < geo.block_size)
    rows = pl.ds(tile_index * geo.block_size, geo.tile)
    k = load(k_ref.at[rows, :], tile_mask(in_tile, dk_cols))
    v = load(v_ref.at[rows, :], tile_mask(in_tile, dv_cols))
    log2_scale = geo.scale * LOG2E
    row = jnp.arange(geo.bwd_rows)
    pair, head = row // geo.heads_pow2, row % geo.heads_pow2
    dk_lanes, dv_lanes = jnp.arange(geo.dk_padded), jnp.arange(geo.dv_padded)
    first, last = offsets_ref[tile_index], offsets_ref[tile_index + 1]
    pairs = geo.bwd_rows // geo.heads_pow2

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
        q = plt.load(
            q_ref.at[query[:, None], head[:, None], dk_lanes[None, :]],
            mask=live[:, None] & (dk_lanes < geo.dk)[None, :],
            other=0,
        )
        do = plt.load(
            do_ref.at[query[:, None], head[:, None], dv_lanes[None, :]],
            mask=live[:, None] & (dv_lanes < geo.dv)[None, :],
            other=0,
        )
        lse = plt.load(lse_ref.at[query, head], mask=live, other=0)
        delta = plt.load(delta_ref.at[query, head], mask=live, other=0)
        valid = live[None, :] & (positions[:, None] <= query[None, :])
        if not geo.aligned:
            valid = (
                valid
                & (positions[:, None] >= start[None, :])
                & (positions[:, None] < start[None, :] + geo.block_size)
            )
        if in_tile is not None:
            valid = valid & in_tile[:, None]
        s = dot_nt(k, q, geo.precision) * log2_scale
        p = jnp.where(valid, jnp.exp2(s - lse[None, :]), 0.0)
        dv = dv + dot(p.astype(do.dtype), do, geo.precision)
        ds = p * (dot_nt(v, do, geo.precision) - delta[None, :])
        dk = dk + dot(ds.astype(q.dtype), q, geo.precision)
        dq = jax.lax.dot_general(
            ds.astype(k.dtype),
            k,
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
            precision=geo.precision,
        )
        # Dead rows point past the end (dropped in interpret mode, masked on GPU).
        target = jnp.where(live, query, geo.length)
        plt.store(
            dq_parts_ref.at[target[:, None], part_slot[:, None], head[:, None], dk_lanes[None, :]],
            (dq * geo.scale).astype(dq_parts_ref.dtype),
            mask=live[:, None] & (dk_lanes < geo.dk)[None, :],
        )
        return dk, dv

    init = (
        jnp.zeros((geo.tile, geo.dk_padded), jnp.float32),
        jnp.zeros((geo.tile, geo.dv_padded), jnp.float32),
    )
    steps = jax.lax.div(last - first + pairs - 1, pairs)
    dk, dv = jax.lax.fori_loop(0, steps, body, init)
    store(dk_ref.at[rows, :], dk * geo.scale, tile_mask(in_tile, dk_cols))
    store(dv_ref.at[rows, :], dv, tile_mask(in_tile, dv_cols))


def _per_head(geo: _Geometry, *trailing: int) -> pl.BlockSpec:
    """Block of a whole row ``[T, ...]`` of one KV head, for grids ``(x, H, B)``."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((None, geo.length, None, *trailing), lambda x, h, b: (b, 0, h, *zeros))


def _forward(q, k, v, key_starts, geo: _Geometry):
    batch, length, heads, _ = k.shape
    q5 = q.reshape(batch, length, heads, geo.group, geo.dk)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo),
        grid=(length, heads, batch),
        in_specs=[
            per_query_block(geo.slots),
            per_query_block(geo.rows, geo.dk_padded),
            _per_head(geo, geo.dk_padded),
            _per_head(geo, geo.dv_padded),
        ],
        out_specs=[per_query_block(geo.rows, geo.dv_padded), per_query_block(geo.rows)],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, geo.group, geo.dv), q.dtype),
            jax.ShapeDtypeStruct((batch, length, heads, geo.rows), jnp.float32),
        ],
        compiler_params=geo.params(geo.tuning.fwd_warps, geo.tuning.fwd_stages),
        interpret=geo.interpret,
        name="nsa_selected_fwd",
    )(key_starts, q5, k, v)
    return out.reshape(batch, length, heads * geo.group, geo.dv), lse


def _backward(q, k, v, key_starts, out, lse, dout, geo: _Geometry):
    batch, length, heads, _ = k.shape
    q5 = q.reshape(batch, length, heads, geo.group, geo.dk)
    do5 = dout.reshape(batch, length, heads, geo.group, geo.dv)
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    delta = delta.reshape(batch, length, heads, geo.group)
    entries, offsets = build_inverse_map(key_starts, block_size=geo.block_size, aligned=geo.aligned)
    num_tiles = key_tile_count(length, geo.block_size)
    whole = lambda size: pl.BlockSpec((None, None, size), lambda a, h, b: (b, h, 0))
    parts_shape = (batch, length, heads, geo.slots * geo.parts, geo.group, geo.dk)
    dk, dv, dq_parts = pl.pallas_call(
        functools.partial(_backward_kernel, geo=geo),
        grid=(num_tiles, heads, batch),
        in_specs=[
            whole(entries.shape[-1]),
            whole(num_tiles + 1),
            _per_head(geo, geo.slots),
            _per_head(geo, geo.heads_pow2, geo.dk_padded),
            _per_head(geo, geo.dk_padded),
            _per_head(geo, geo.dv_padded),
            _per_head(geo, geo.heads_pow2, geo.dv_padded),
            _per_head(geo, geo.heads_pow2),
            _per_head(geo, geo.heads_pow2),
        ],
        out_specs=[
            _per_head(geo, geo.dk_padded),
            _per_head(geo, geo.dv_padded),
            _per_head(geo, geo.slots * geo.parts, geo.heads_pow2, geo.dk_padded),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(parts_shape, jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32),
        ],
        compiler_params=geo.params(geo.tuning.bwd_warps, geo.tuning.bwd_stages),
        interpret=geo.interpret,
        name="nsa_selected_bwd",
    )(entries, offsets, key_starts, q5, k, v, do5, lse, delta)
    listed = listed_parts(key_starts, block_size=geo.block_size, aligned=geo.aligned)
    dq = jnp.sum(jnp.where(listed[..., None, None], dq_parts.astype(jnp.float32), 0.0), axis=3)
    return dq.reshape(q.shape).astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, key_starts, geo: _Geometry):
    return _forward(q, k, v, key_starts, geo)[0]


def _attention_fwd(q, k, v, key_starts, geo: _Geometry):
    out, lse = _forward(q, k, v, key_starts, geo)
    return out, (q, k, v, key_starts, out, lse)


def _attention_bwd(geo: _Geometry, residuals, dout):
    q, k, v, key_starts, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, key_starts, out, lse, dout, geo)
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
    tuning: SelectionTuning = DEFAULT_TUNING,
) -> jax.Array:
    """Selected attention with a Pallas forward and backward; see :func:`nsa_jax.selected_attention`.

    Args:
      q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; one float dtype.
      block_indices: int ``[B, T, H, n]``, ``-1`` for unused slots, any order.
      block_size: ``l'``; scale: logit scale; segment_ids: int ``[B, T]`` or ``None``.
      interpret: run the kernels in Pallas interpret mode (CPU).
      tuning: warps and pipeline stages per kernel.

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
        tuning=tuning,
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
