"""Decode-step reads of the selected and window branches as one Pallas kernel (Triton lowering).

Spec, "Decoding": a step reads ``n * l'`` selected and ``w`` window tokens per KV head.
With one query per sequence, one program per (sequence, KV head) would leave most of
the GPU idle at small batch, so the reads are split (flash-decoding style): the work
items are the ``n`` selected blocks and the ``ceil(w / l') + 1`` aligned blocks that
cover the window; each program finds the first keys of its ``items_per_program`` items
from the block indices and the query position, streams them for the ``G`` query heads
of its group and writes an unnormalised partial ``(max, sum, acc)``; the partials of
each branch are merged in XLA.

The launch, ``(num_warps, num_stages, target programs, items per step)``, takes the
fewest items per program whose programs stay within the target (the programs that fit
on the GPU at once: a second wave would add a whole program's latency chain) and loads
``items per step`` blocks before using any, so that several blocks' loads are in flight
per program. Empty items (unused slots, blocks past the query) read nothing. With one
program per branch (for instance a target below ``3 * B * H``) each program normalises
and writes its branch's output and XLA merges nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gpu.tiles import LOG2E, MASKED, dot, dot_nt, lanes, load, padded, store, tile_mask

# (num_warps, num_stages, target programs, items loaded per loop step): one block per step
# needs 59 KB of shared memory and 128 registers a thread at Dk=192 (kernel_resources), so
# three programs fit on every SM of an H100/H200 (132) at once.
_LAUNCH = (4, 2, 396, 1)


@dataclasses.dataclass(frozen=True)
class _DecodeGeometry:
    capacity: int
    slots: int
    block_size: int
    window: int
    group: int
    dk: int
    dv: int
    scale: float
    selected_programs: int
    window_programs: int
    items_per_program: int
    items_per_step: int
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

    @property
    def normalised(self) -> bool:
        """One program per branch: it writes the branch's output, no partials to merge."""
        return self.programs == 2


def window_items(block_size: int, window: int) -> int:
    """Aligned blocks of ``block_size`` that can overlap a window of ``w`` keys."""
    return -(-window // block_size) + 1


def _item_start(program, item, position, indices_ref, geo: _DecodeGeometry) -> jax.Array:
    """First key of work item ``item`` of ``program``, ``-1`` for none.

    Selected programs take the blocks of ``indices_ref`` in slot order (a block past the
    query, or an unused slot, is none); window programs take the aligned blocks from the
    one holding the window's first key.
    """
    slot = program * geo.items_per_program + item
    block = indices_ref[jnp.minimum(slot, geo.slots - 1)]
    selected = jnp.where((slot < geo.slots) & (block >= 0), block * geo.block_size, -1)
    lowest = jnp.maximum(position - geo.window + 1, 0)
    chunk = slot - geo.selected_programs * geo.items_per_program
    windowed = jax.lax.div(lowest, geo.block_size) * geo.block_size + chunk * geo.block_size
    start = jnp.where(program < geo.selected_programs, selected, windowed)
    return jnp.where(start <= position, start, -1)


def _decode_kernel(position_ref, indices_ref, q_ref, k_ref, v_ref, *out_refs, geo):
    """One (work-item group, KV head, sequence): ``indices_ref [n']`` (the row's selected
    blocks), ``q_ref [rows, Dk']``, ``k_ref [S, Dk']``; writes the branch output ``[rows, Dv']``
    when ``geo.normalised``, else partials ``max``/``sum [rows]`` and ``acc [rows, Dv']``."""
    program = pl.program_id(0)
    position = position_ref[0]
    lowest = jnp.where(program >= geo.selected_programs, position - geo.window + 1, 0)
    head_rows = lanes(geo.group, geo.rows)
    dk_cols, dv_cols = lanes(geo.dk, padded(geo.dk)), lanes(geo.dv, padded(geo.dv))
    q = load(q_ref, tile_mask(head_rows, dk_cols))
    log2_scale = geo.scale * LOG2E
    offsets = jnp.arange(geo.tile)

    def load_item(item):
        start = _item_start(program, item, position, indices_ref, geo)
        first = jnp.maximum(start, 0)
        keys = first + offsets
        readable = (start >= 0) & (keys < geo.capacity) & (offsets < geo.block_size)
        valid = readable & (keys <= position) & (keys >= lowest)
        rows = pl.ds(first, geo.tile)
        k = load(k_ref.at[rows, :], tile_mask(readable, dk_cols))
        v = load(v_ref.at[rows, :], tile_mask(readable, dv_cols))
        return valid, k, v

    def body(step, carry):
        # Every block of the step is loaded before the first is used: their loads overlap.
        items = [load_item(step * geo.items_per_step + u) for u in range(geo.items_per_step)]
        acc, row_max, row_sum = carry
        for valid, k, v in items:
            s = jnp.where(valid[None, :], dot_nt(q, k, None) * log2_scale, MASKED)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
            p = jnp.where(valid[None, :], jnp.exp2(s - new_max[:, None]), 0.0)
            alpha = jnp.exp2(row_max - new_max)
            row_sum = row_sum * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, None)
            row_max = new_max
        return acc, row_max, row_sum

    init = (
        jnp.zeros((geo.rows, padded(geo.dv)), jnp.float32),
        jnp.full((geo.rows,), MASKED, jnp.float32),
        jnp.zeros((geo.rows,), jnp.float32),
    )
    steps = geo.items_per_program // geo.items_per_step
    acc, row_max, row_sum = jax.lax.fori_loop(0, steps, body, init)
    if geo.normalised:
        (out_ref,) = out_refs
        out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]
        store(out_ref, out, tile_mask(head_rows, dv_cols))
        return
    max_ref, sum_ref, acc_ref = out_refs
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


def _items_per_program(slots: int, windowed: int, rows: int, launch: tuple[int, int, int, int]) -> int:
    """Fewest items per program (a multiple of items per step) whose ``rows * programs`` stay
    within the target; all of a branch's items in one program when none does."""
    step = launch[3]
    most = -(-max(slots, windowed) // step) * step
    for per in range(step, most, step):
        if rows * (-(-slots // per) + -(-windowed // per)) <= launch[2]:
            return per
    return most


@functools.partial(jax.jit, static_argnames=("block_size", "window", "scale", "launch", "interpret"))
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
    launch: tuple[int, int, int, int] = _LAUNCH,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Selected and window attention of one decode step; see
    :func:`nsa_jax.decoding.selected_and_window_at`.

    Args:
      q: ``[B, HQ, Dk]``; block_indices: int ``[B, H, n]``; keys: ``[3, B, S, H, Dk]``
      and values ``[3, B, S, H, Dv]`` (branch 1 selected, 2 window); lengths: int
      ``[B]``, the query of row ``b`` at ``lengths[b] - 1``.
      launch: ``(num_warps, num_stages, target programs, items loaded per loop step)``.

    Returns:
      ``(selected, window)``, each ``[B, HQ, Dv]`` in ``q.dtype``.
    """
    if min(launch) < 1:
        raise ValueError(f"launch entries must be >= 1, got {launch}")
    batch, q_heads, dk = q.shape
    _, _, capacity, kv_heads, dv = values.shape
    group = q_heads // kv_heads
    slots = block_indices.shape[-1]
    windowed = window_items(block_size, window)
    per = _items_per_program(slots, windowed, batch * kv_heads, launch)
    geo = _DecodeGeometry(
        capacity=capacity,
        slots=slots,
        block_size=block_size,
        window=window,
        group=group,
        dk=dk,
        dv=dv,
        scale=float(scale),
        selected_programs=-(-slots // per),
        window_programs=-(-windowed // per),
        items_per_program=per,
        items_per_step=launch[3],
        interpret=interpret,
    )
    positions = (lengths - 1).astype(jnp.int32)
    q4 = q.reshape(batch, kv_heads, group, dk)
    dkp, dvp = padded(dk), padded(dv)

    def branch_of(program):
        return 1 + (program >= geo.selected_programs).astype(jnp.int32)

    partial = lambda *trailing: pl.BlockSpec(
        (None, None, None, *trailing), lambda p, h, b: (b, h, p, *(0,) * len(trailing))
    )
    if geo.normalised:
        out_specs = [pl.BlockSpec((None, None, None, geo.rows, dvp), lambda p, h, b: (p, b, h, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((2, batch, kv_heads, group, dv), q.dtype)]
    else:
        out_specs = [partial(geo.rows), partial(geo.rows), partial(geo.rows, dvp)]
        shape = (batch, kv_heads, geo.programs, geo.rows)
        out_shape = [
            jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct((*shape, dvp), jnp.float32),
        ]
    results = pl.pallas_call(
        functools.partial(_decode_kernel, geo=geo),
        grid=(geo.programs, kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, 1), lambda p, h, b: (b, 0)),
            # Power-of-two block for the Triton lowering; only the first n entries are read.
            pl.BlockSpec((None, None, padded(slots)), lambda p, h, b: (b, h, 0)),
            pl.BlockSpec((None, None, geo.rows, dkp), lambda p, h, b: (b, h, 0, 0)),
            pl.BlockSpec((None, None, capacity, None, dkp), lambda p, h, b: (branch_of(p), b, 0, h, 0)),
            pl.BlockSpec((None, None, capacity, None, dvp), lambda p, h, b: (branch_of(p), b, 0, h, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=launch[0], num_stages=launch[1]),
        interpret=interpret,
        name="nsa_decode_selected_window",
    )(positions[:, None], block_indices.astype(jnp.int32), q4, keys, values)
    if geo.normalised:
        return tuple(o.reshape(batch, q_heads, dv) for o in results[0])
    row_max, row_sum, acc = results
    row_max, row_sum, acc = row_max[..., :group], row_sum[..., :group], acc[..., :group, :dv]
    split = geo.selected_programs
    outputs = (
        _merge(row_max[:, :, :split], row_sum[:, :, :split], acc[:, :, :split]),
        _merge(row_max[:, :, split:], row_sum[:, :, split:], acc[:, :, split:]),
    )
    return tuple(o.reshape(batch, q_heads, dv).astype(q.dtype) for o in outputs)
