"""Decode-step reads of the selected and window branches as one Pallas kernel (Triton lowering).

Spec, "Decoding": a step reads ``n * l'`` selected and ``w`` window tokens per KV head.
With one query per sequence, one program per (sequence, KV head) would leave most of
the GPU idle at small batch, so the reads are split (flash-decoding style): the work
items are the ``n`` selected blocks and the ``ceil(w / l') + 1`` aligned blocks that
cover the window; each program finds the first keys of its ``items_per_program`` items
from the block indices and the query position, streams them for the ``G`` query heads
of its group (``Dk`` in power-of-two column pieces, 192 = 128 + 64, whose dots are
summed) and writes an unnormalised partial ``(max, sum, acc)`` into its
(sequence, KV head)'s ``[2, P', G', Dv']`` partials (branch, program of the branch).
It then takes a ticket from a per-(sequence, KV head) counter (an acquire-release
atomic after a block barrier, so that the other programs' partials are visible to the
last one); the program that draws the last ticket merges each branch's partials and
writes both normalised outputs, so no XLA merge follows the kernel. The counters are
zeroed by XLA before the launch. In Pallas interpret mode the programs run one after
another, so the last ticket goes to the last program and the barrier (a GPU-only
primitive) is left out.

The programs' work (:func:`read_and_merge`) is also the second half of
:func:`pallas_kernels.gpu.decode_step.whole_step`'s second kernel, whose selected-block
programs first pick the blocks themselves (:func:`reads_geometry` and :func:`reads_specs`
give it the same programs and blocks).

The launch, ``(num_warps, num_stages, target programs, items per step)``, takes the
fewest items per program whose programs stay within the target (the programs that fit
on the GPU at once: a second wave would add a whole program's latency chain) and loads
``items per step`` blocks before using any, so that several blocks' loads are in flight
per program. Empty items (unused slots, blocks past the query) read nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gpu.tiles import (
    LOG2E,
    MASKED,
    empty_softmax_state,
    lanes,
    load,
    load_pieces,
    online_softmax_step,
    padded,
    per_sequence_block,
    store,
    tile_mask,
)

# (num_warps, num_stages, target programs, items loaded per loop step): one block per step
# and three stages (two buffers, so the next block loads while one is used), two programs
# per SM of an H100/H200 (132). Fastest of the H200 sweep at B=16, S=64K: 0.041 / 0.034 ms
# (Dk=192 / 128) against 0.052 / 0.040 for (4, 2, 396, 1); timed inside the whole step (session
# 12, Dk=128 / 192), 20.1 / 23.0 us against 20.7-27.8 / 24.4-31.5 for five other launches
# (experiments/results/decode_h200.md). The whole step's second kernel (selection + these reads) takes
# it too: 87.4 us a step against 86.8-95.6 for four others at Dk=192 (session 21, --tune).
DEFAULT_LAUNCH = (4, 3, 264, 1)
# Partials the merging program loads per step.
_MERGE_UNROLL = 8


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
    def partials(self) -> int:
        """Partials per branch in the scratch arrays: the larger branch's programs, padded."""
        return pl.next_power_of_2(max(self.selected_programs, self.window_programs))


def window_items(block_size: int, window: int) -> int:
    """Aligned blocks of ``block_size`` that can overlap a window of ``w`` keys."""
    return -(-window // block_size) + 1


def _item_start(program, item, position, indices: jax.Array, geo: _DecodeGeometry) -> jax.Array:
    """First key of work item ``item`` of ``program``, ``-1`` for none.

    Selected programs take the blocks of ``indices`` (the row's ``[n']``, loaded once) in
    slot order (a block past the query, or an unused slot, is none); window programs take
    the aligned blocks from the one holding the window's first key. No load: the pipeliner
    can issue the next item's key and value loads while one is used.
    """
    slot = program * geo.items_per_program + item
    lanes_ = jnp.arange(indices.shape[0])
    block = jnp.sum(jnp.where(lanes_ == slot, indices, 0))
    selected = jnp.where((slot < geo.slots) & (block >= 0), block * geo.block_size, -1)
    lowest = jnp.maximum(position - geo.window + 1, 0)
    chunk = slot - geo.selected_programs * geo.items_per_program
    windowed = jax.lax.div(lowest, geo.block_size) * geo.block_size + chunk * geo.block_size
    start = jnp.where(program < geo.selected_programs, selected, windowed)
    return jnp.where(start <= position, start, -1)


def _decode_kernel(
    length_ref,
    indices_ref,
    q_ref,
    k_ref,
    v_ref,
    _count_in,
    out_ref,
    max_ref,
    sum_ref,
    acc_ref,
    count_ref,
    *,
    geo,
):
    """One (work-item group, KV head, sequence): ``indices_ref [n']`` (the row's selected
    blocks), the rest as :func:`read_and_merge`'s (``count_ref`` aliased to ``_count_in``)."""
    # The row's selected blocks, loaded once (the block is padded to a power of two).
    indices = load(indices_ref, lanes(geo.slots, indices_ref.shape[0]))
    refs = (q_ref, k_ref, v_ref, out_ref, max_ref, sum_ref, acc_ref, count_ref)
    read_and_merge(geo, pl.program_id(0), length_ref[0] - 1, indices, *refs)


def read_and_merge(
    geo: _DecodeGeometry,
    program,
    position,
    indices,
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    max_ref,
    sum_ref,
    acc_ref,
    count_ref,
) -> None:
    """The reads of ``program`` (``pl.program_id(0)``, read by the caller: interpret mode
    takes it only outside ``pl.when``) for the query at ``position``, with the row's
    selected blocks ``indices [n']`` (int32, ``-1`` for none; window programs ignore them):
    ``q_ref [rows, Dk']``, ``k_ref [S, Dk']``, ``v_ref [S, Dv']``. Writes its partial into
    ``max_ref``/``sum_ref [2, P', rows]`` and ``acc_ref [2, P', rows, Dv']`` and, in the
    program that draws the last ticket of ``count_ref [1]``, both branches' outputs
    ``out_ref [2, rows, Dv']``."""
    lowest = jnp.where(program >= geo.selected_programs, position - geo.window + 1, 0)
    head_rows = lanes(geo.group, geo.rows)
    dv_cols = lanes(geo.dv, padded(geo.dv))
    q = load_pieces(q_ref, slice(None), geo.dk, head_rows)
    log2_scale = geo.scale * LOG2E
    offsets = jnp.arange(geo.tile)

    def load_item(item):
        start = _item_start(program, item, position, indices, geo)
        first = jnp.maximum(start, 0)
        keys = first + offsets
        readable = (start >= 0) & (keys < geo.capacity) & (offsets < geo.block_size)
        valid = readable & (keys <= position) & (keys >= lowest)
        rows = pl.ds(first, geo.tile)
        k = load_pieces(k_ref, rows, geo.dk, readable)
        v = load(v_ref.at[rows, :], tile_mask(readable, dv_cols))
        return valid, k, v

    def body(step, carry):
        # Every block of the step is loaded before the first is used: their loads overlap.
        items = [load_item(step * geo.items_per_step + u) for u in range(geo.items_per_step)]
        for valid, k, v in items:
            # Decode reads memory far more than it computes: its exps keep libdevice's exp2.
            carry = online_softmax_step(carry, q, k, v, valid, log2_scale, None, flush=False)
        return carry

    steps = geo.items_per_program // geo.items_per_step
    init = empty_softmax_state(geo.rows, padded(geo.dv))
    acc, row_max, row_sum = jax.lax.fori_loop(0, steps, body, init)
    branch = (program >= geo.selected_programs).astype(jnp.int32)
    index = program - branch * geo.selected_programs
    max_ref[branch, index, :] = row_max
    sum_ref[branch, index, :] = row_sum
    acc_ref[branch, index, :, :] = acc
    if not geo.interpret:
        # Every thread's partial stores before the ticket (released by one thread).
        plt.debug_barrier()
    ticket = plt.atomic_add(count_ref, jnp.int32(0), jnp.int32(1))

    @pl.when(ticket == geo.programs - 1)
    def _merge():
        for which, count in enumerate((geo.selected_programs, geo.window_programs)):
            # A traced index: interpret mode's masked store takes no Python int.
            at = jnp.int32(which)
            out = _merge_partials(geo, max_ref, sum_ref, acc_ref, at, count)
            store(out_ref.at[at], out, tile_mask(head_rows, dv_cols))


def _merge_partials(geo: _DecodeGeometry, max_ref, sum_ref, acc_ref, branch, count: int) -> jax.Array:
    """Normalised merge of the first ``count`` partials of ``branch`` in ``max_ref``/``sum_ref
    [2, P', rows]`` and ``acc_ref [2, P', rows, Dv']``: float32 ``[rows, Dv']``."""
    live = jnp.arange(geo.partials)[:, None] < count
    maxes = jnp.where(live, max_ref[branch, :, :], MASKED)
    top = jnp.max(maxes, axis=0)
    weights = jnp.where(live, jnp.exp2(maxes - top[None, :]), 0.0)
    total = jnp.sum(jnp.where(live, sum_ref[branch, :, :], 0.0) * weights, axis=0)
    unroll = min(count, _MERGE_UNROLL)

    def merge(i, acc, size=unroll):
        # Not software-pipelined: each step issues several partials' loads at once.
        for u in range(size):
            part = i * unroll + u
            weight = jnp.exp2(max_ref[branch, part, :] - top)
            acc = acc + acc_ref[branch, part, :, :] * weight[:, None]
        return acc

    full, rest = divmod(count, unroll)
    acc = jax.lax.fori_loop(0, full, merge, jnp.zeros((geo.rows, padded(geo.dv)), jnp.float32))
    if rest:
        acc = merge(full, acc, rest)
    return acc / jnp.where(total > 0, total, 1.0)[:, None]


def _items_per_program(slots: int, windowed: int, rows: int, launch: tuple[int, int, int, int]) -> int:
    """Fewest items per program (a multiple of items per step) whose ``rows * programs`` stay
    within the target; all of a branch's items in one program when none does."""
    step = launch[3]
    most = -(-max(slots, windowed) // step) * step
    for per in range(step, most, step):
        if rows * (-(-slots // per) + -(-windowed // per)) <= launch[2]:
            return per
    return most


def reads_geometry(
    q: jax.Array,
    values: jax.Array,
    slots: int,
    *,
    block_size: int,
    window: int,
    scale: float,
    launch: tuple[int, int, int, int],
    interpret: bool,
) -> _DecodeGeometry:
    """The reads' programs for ``q [B, HQ, Dk]``, ``values [3, B, S, H, Dv]`` and ``slots``
    selected blocks a row, under ``launch`` (see :func:`selected_and_window`)."""
    if min(launch) < 1:
        raise ValueError(f"launch entries must be >= 1, got {launch}")
    batch, q_heads, dk = q.shape
    _, _, capacity, kv_heads, dv = values.shape
    windowed = window_items(block_size, window)
    per = _items_per_program(slots, windowed, batch * kv_heads, launch)
    return _DecodeGeometry(
        capacity=capacity,
        slots=slots,
        block_size=block_size,
        window=window,
        group=q_heads // kv_heads,
        dk=dk,
        dv=dv,
        scale=float(scale),
        selected_programs=-(-slots // per),
        window_programs=-(-windowed // per),
        items_per_program=per,
        items_per_step=launch[3],
        interpret=interpret,
    )


def reads_specs(geo: _DecodeGeometry, batch: int, kv_heads: int, dtype) -> tuple[list, list, list]:
    """Block specs of a grid ``(programs, H, B)`` over the reads: ``(in_specs`` of ``q [B, H,
    rows, Dk']``, ``keys``, ``values`` and the counters ``[B, H, 1]``, ``out_specs, out_shape)``
    of the outputs ``[2, B, H, G, Dv]``, the partials' scratch and the counters."""
    dkp, dvp = padded(geo.dk), padded(geo.dv)

    def branch_of(program):
        return 1 + (program >= geo.selected_programs).astype(jnp.int32)

    capacity = geo.capacity
    partials = (batch, kv_heads, 2, geo.partials, geo.rows)
    in_specs = [
        pl.BlockSpec((None, None, geo.rows, dkp), lambda p, h, b: (b, h, 0, 0)),
        pl.BlockSpec((None, None, capacity, None, dkp), lambda p, h, b: (branch_of(p), b, 0, h, 0)),
        pl.BlockSpec((None, None, capacity, None, dvp), lambda p, h, b: (branch_of(p), b, 0, h, 0)),
        per_sequence_block(1),
    ]
    out_specs = [
        pl.BlockSpec((2, None, None, geo.rows, dvp), lambda p, h, b: (0, b, h, 0, 0)),
        per_sequence_block(2, geo.partials, geo.rows),
        per_sequence_block(2, geo.partials, geo.rows),
        per_sequence_block(2, geo.partials, geo.rows, dvp),
        per_sequence_block(1),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((2, batch, kv_heads, geo.group, geo.dv), dtype),
        jax.ShapeDtypeStruct(partials, jnp.float32),
        jax.ShapeDtypeStruct(partials, jnp.float32),
        jax.ShapeDtypeStruct((*partials, dvp), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, 1), jnp.int32),
    ]
    return in_specs, out_specs, out_shape


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
    launch: tuple[int, int, int, int] = DEFAULT_LAUNCH,
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
    batch, q_heads, dk = q.shape
    kv_heads = values.shape[3]
    slots = block_indices.shape[-1]
    geo = reads_geometry(
        q,
        values,
        slots,
        block_size=block_size,
        window=window,
        scale=scale,
        launch=launch,
        interpret=interpret,
    )
    in_specs, out_specs, out_shape = reads_specs(geo, batch, kv_heads, q.dtype)
    out, *_ = pl.pallas_call(
        functools.partial(_decode_kernel, geo=geo),
        grid=(geo.programs, kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, 1), lambda p, h, b: (b, 0)),
            # Power-of-two block for the Triton lowering; only the first n entries are read.
            per_sequence_block(padded(slots)),
            *in_specs,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={5: 4},
        compiler_params=plt.CompilerParams(num_warps=launch[0], num_stages=launch[1]),
        interpret=interpret,
        name="nsa_decode_selected_window",
    )(
        lengths.astype(jnp.int32)[:, None],
        block_indices.astype(jnp.int32),
        q.reshape(batch, kv_heads, geo.group, dk),
        keys,
        values,
        jnp.zeros((batch, kv_heads, 1), jnp.int32),
    )
    return out[0].reshape(batch, q_heads, geo.dv), out[1].reshape(batch, q_heads, geo.dv)
