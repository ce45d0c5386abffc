"""Decode-step reads of the selected and window branches as one Pallas kernel (Triton lowering).

Spec, "Decoding": a step reads ``n * l'`` selected and ``w`` window tokens per KV head.
With one query per sequence, one program per (sequence, KV head) would leave most of
the GPU idle at small batch, so the reads are split (flash-decoding style): the work
items are the ``n`` selected blocks and the ``ceil(w / l') + 1`` aligned blocks that
cover the window; each program streams ``items_per_program`` of them for the ``G``
query heads of its group and writes an unnormalised partial ``(max, sum, acc)``; the
partials of each branch are merged in XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gpu.tiles import LOG2E, MASKED, dot, dot_nt, lanes, load, padded, tile_mask

# Enough programs to keep every SM of an H100/H200 (132) busy twice over.
_TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class _DecodeGeometry:
    capacity: int
    block_size: int
    window: int
    group: int
    dk: int
    dv: int
    scale: float
    selected_programs: int
    window_programs: int
    items_per_program: int
    interpret: bool

    @property
    def rows(self) -> int:
        return padded(self.group)

    @property
    def tile(self) -> int:
        return padded(self.block_size)

    @property
    def programs(self) -> int:
        return self.selected_programs + self.window_programs


def window_items(block_size: int, window: int) -> int:
    """Aligned blocks of ``block_size`` that can overlap a window of ``w`` keys."""
    return -(-window // block_size) + 1


def _work_item_starts(block_indices: jax.Array, positions: jax.Array, geo: _DecodeGeometry) -> jax.Array:
    """First key of every work item, ``-1`` for none: int32 ``[B, H, programs * items]``.

    Selected blocks fill the first ``selected_programs * items`` entries, window blocks
    the rest; a selected block past the query is dropped (``-1``).
    """
    per = geo.items_per_program
    starts = jnp.where(block_indices >= 0, block_indices * geo.block_size, -1)
    starts = jnp.where(starts <= positions[:, None, None], starts, -1)
    starts = jnp.pad(
        starts, ((0, 0), (0, 0), (0, geo.selected_programs * per - starts.shape[-1])), constant_values=-1
    )
    lowest = jnp.maximum(positions - geo.window + 1, 0)
    base = (lowest // geo.block_size) * geo.block_size
    chunks = base[:, None] + jnp.arange(geo.window_programs * per, dtype=jnp.int32) * geo.block_size
    chunks = jnp.where(chunks <= positions[:, None], chunks, -1)
    chunks = jnp.broadcast_to(chunks[:, None, :], (*starts.shape[:2], chunks.shape[-1]))
    return jnp.concatenate([starts, chunks], axis=-1).astype(jnp.int32)


def _decode_kernel(position_ref, starts_ref, q_ref, k_ref, v_ref, max_ref, sum_ref, acc_ref, *, geo):
    """One (work-item group, KV head, sequence): ``q_ref [rows, Dk']``, ``k_ref [S, Dk']``."""
    program = pl.program_id(0)
    position = position_ref[0]
    lowest = jnp.where(program >= geo.selected_programs, position - geo.window + 1, 0)
    head_rows = lanes(geo.group, geo.rows)
    dk_cols, dv_cols = lanes(geo.dk, padded(geo.dk)), lanes(geo.dv, padded(geo.dv))
    q = load(q_ref, tile_mask(head_rows, dk_cols))
    log2_scale = geo.scale * LOG2E
    offsets = jnp.arange(geo.tile)

    def body(item, carry):
        acc, row_max, row_sum = carry
        start = starts_ref[program * geo.items_per_program + item]
        first = jnp.maximum(start, 0)
        keys = first + offsets
        readable = (keys < geo.capacity) & (offsets < geo.block_size)
        valid = (start >= 0) & readable & (keys <= position) & (keys >= lowest)
        rows = pl.ds(first, geo.tile)
        k = load(k_ref.at[rows, :], tile_mask(readable, dk_cols))
        v = load(v_ref.at[rows, :], tile_mask(readable, dv_cols))
        s = jnp.where(valid[None, :], dot_nt(q, k, None) * log2_scale, MASKED)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        p = jnp.where(valid[None, :], jnp.exp2(s - new_max[:, None]), 0.0)
        alpha = jnp.exp2(row_max - new_max)
        row_sum = row_sum * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, None)
        return acc, new_max, row_sum

    init = (
        jnp.zeros((geo.rows, padded(geo.dv)), jnp.float32),
        jnp.full((geo.rows,), MASKED, jnp.float32),
        jnp.zeros((geo.rows,), jnp.float32),
    )
    acc, row_max, row_sum = jax.lax.fori_loop(0, geo.items_per_program, body, init)
    max_ref[...] = row_max
    sum_ref[...] = row_sum
    acc_ref[...] = acc


def _merge(row_max: jax.Array, row_sum: jax.Array, acc: jax.Array) -> jax.Array:
    """Merges partials along axis 2: ``[B, H, P, G]`` (and ``[B, H, P, G, Dv]``) to ``[B, H, G, Dv]``."""
    top = jnp.max(row_max, axis=2, keepdims=True)
    weight = jnp.exp2(row_max - top)
    total = jnp.sum(weight * row_sum, axis=2)
    out = jnp.sum(weight[..., None] * acc, axis=2)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("block_size", "window", "scale", "interpret"))
def selected_and_window(
    q: jax.Array,
    block_indices: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    lengths: jax.Array,
    *,
    block_size: int,
    window: int,
    scale: float,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Selected and window attention of one decode step; see
    :func:`nsa_jax.decoding.selected_and_window_at`.

    Args:
      q: ``[B, HQ, Dk]``; block_indices: int ``[B, H, n]``; keys: ``[3, B, S, H, Dk]``
      and values ``[3, B, S, H, Dv]`` (branch 1 selected, 2 window); lengths: int
      ``[B]``, the query of row ``b`` at ``lengths[b] - 1``.

    Returns:
      ``(selected, window)``, each ``[B, HQ, Dv]`` in ``q.dtype``.
    """
    batch, q_heads, dk = q.shape
    _, _, capacity, kv_heads, dv = values.shape
    group = q_heads // kv_heads
    slots = block_indices.shape[-1]
    items = slots + window_items(block_size, window)
    per = max(1, min(slots, (batch * kv_heads * items) // _TARGET_PROGRAMS))
    geo = _DecodeGeometry(
        capacity=capacity,
        block_size=block_size,
        window=window,
        group=group,
        dk=dk,
        dv=dv,
        scale=float(scale),
        selected_programs=-(-slots // per),
        window_programs=-(-window_items(block_size, window) // per),
        items_per_program=per,
        interpret=interpret,
    )
    positions = (lengths - 1).astype(jnp.int32)
    starts = _work_item_starts(block_indices.astype(jnp.int32), positions, geo)
    # Power-of-two block for the Triton lowering; the tail is never read.
    listed = pl.next_power_of_2(starts.shape[-1])
    starts = jnp.pad(starts, ((0, 0), (0, 0), (0, listed - starts.shape[-1])), constant_values=-1)
    q4 = q.reshape(batch, kv_heads, group, dk)
    dkp, dvp = padded(dk), padded(dv)

    def branch_of(program):
        return 1 + (program >= geo.selected_programs).astype(jnp.int32)

    partial = lambda *trailing: pl.BlockSpec(
        (None, None, None, *trailing), lambda p, h, b: (b, h, p, *(0,) * len(trailing))
    )
    row_max, row_sum, acc = pl.pallas_call(
        functools.partial(_decode_kernel, geo=geo),
        grid=(geo.programs, kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, 1), lambda p, h, b: (b, 0)),
            pl.BlockSpec((None, None, listed), lambda p, h, b: (b, h, 0)),
            pl.BlockSpec((None, None, geo.rows, dkp), lambda p, h, b: (b, h, 0, 0)),
            pl.BlockSpec((None, None, capacity, None, dkp), lambda p, h, b: (branch_of(p), b, 0, h, 0)),
            pl.BlockSpec((None, None, capacity, None, dvp), lambda p, h, b: (branch_of(p), b, 0, h, 0)),
        ],
        out_specs=[partial(geo.rows), partial(geo.rows), partial(geo.rows, dvp)],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, geo.programs, geo.rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.programs, geo.rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.programs, geo.rows, dvp), jnp.float32),
        ],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="nsa_decode_selected_window",
    )(positions[:, None], starts, q4, keys, values)
    row_max, row_sum, acc = row_max[..., :group], row_sum[..., :group], acc[..., :group, :dv]
    split = geo.selected_programs
    outputs = (
        _merge(row_max[:, :, :split], row_sum[:, :, :split], acc[:, :, :split]),
        _merge(row_max[:, :, split:], row_sum[:, :, split:], acc[:, :, split:]),
    )
    return tuple(o.reshape(batch, q_heads, dv).astype(q.dtype) for o in outputs)
