"""Compressed attention and block selection of one decode step as two Pallas kernels (Triton lowering).

Spec, "Decoding", "Compression branch (Eqs. 7-8)", "Selection scores (Eqs. 8-10)" and
Eq. 11, for one query per sequence at position ``t = lengths - 1`` (no segments: the
decode cache holds one sequence per row).

Kernel 1 (``nsa_decode_compressed``), grid ``(P, H, B)``: the ``Tc`` compressed tokens
of a (sequence, KV head) are split into ``P`` chunks (flash-decoding style) so that
``P * H * B`` programs fill the GPU even at batch 1. A program loads the ``G`` query
heads of its group as one ``[G', Dk]`` tile (``Dk`` in power-of-two column pieces,
192 = 128 + 64, whose dots are summed), streams its chunk ``tile`` tokens at a time and
writes an unnormalised partial ``(max, sum, acc)`` of the compressed attention plus the
scaled logits ``q . k_cmp * scale`` of its tokens (float32 ``[B, H, G', P*chunk]``,
``Tc * G`` floats per row: 1/4 (Dk=128) to 1/6 (Dk=192) of the compressed keys' bytes).
It also zeroes kernel 2's per-(sequence, KV head) counter.

Kernel 2 (``nsa_decode_select``), grid ``(Q, H, B)``: the ``Nb`` selection blocks of a
(sequence, KV head) are split into ``Q`` parts of ``K`` blocks (``Q * H * B`` programs
near a target, as in kernel 1, instead of one program per (sequence, KV head) doing it
all in sequence). Every program merges the ``P`` (max, sum) partials into the per-head
log-sum-exp; the first ``min(Q, Dv' / W)`` programs each write an equal column slice of
the merged compressed output, ``W`` columns (one ``[P, G', W]`` load) at a time; and
every program scores its ``K`` blocks from the stored logits exactly as
:mod:`pallas_kernels.gpu.select_blocks`
does from recomputed ones (``p = exp(s - lse)``, Eq. 9 weights, group sum of Eq. 10)
into a float32 ``[B, H, Nb']`` importance row. It then takes a ticket from the counter
(an acquire-release atomic after a block barrier, so the row's other parts are visible
to the last one); the program that draws the last ticket picks the top ``n`` of the
whole row with the forced blocks (Eq. 11; one argmax reduction per pick, lowest index on
ties, as ``lax.top_k``) and writes them sorted ascending with the unused slots (``-1``)
last (rank by pairwise comparison of ``n'`` picks). Each block's importance is a function of its own logits
and the per-head ``lse`` only (every part computes the same ``lse`` from the same
partials), so exact ties stay exact. With ``Q = 1`` this is one program per (sequence,
KV head) that does all of it (the previous kernel 2).

Two launches and no host sync (with :mod:`pallas_kernels.gpu.decode` for the selected
and window reads, three kernels make a decode step). Besides the inputs, HBM traffic is
the logits (written once, read at most ``len(weights) / (l'/d) < 2`` times per visible
token), the ``[B, H, P, G', Dv']`` partials and the ``[B, H, Nb']`` importance rows.
In Pallas interpret mode the programs run one after another, so the last ticket goes
to the last program and the barrier (a GPU-only primitive) is left out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from nsa_jax.reference.selection import overlap_weights
from pallas_kernels.gpu.tiles import (
    LOG2E,
    MASKED,
    column_pieces,
    dot,
    dot_nt,
    lanes,
    load,
    padded,
    require_supported_dtype,
    store,
    tile_mask,
)

# Kernel 1's launch: compressed tokens per inner step (rows of the key tile), warps, stages,
# and the programs to aim for. Three stages give two buffers, so the next tile loads while one
# is used (two stages give one: load, then use); with Dk in column pieces that is 90 KB
# (Dk=192) / 72 KB (Dk=128) of shared memory and 140 / 128 registers (kernel_resources), two
# programs per SM, so 264 programs are one wave on the 132 SMs of an H100/H200.
_LAUNCH = (64, 4, 3, 264)
# Kernel 2's launch: warps and the programs to aim for (one wave, as kernel 1).
_SELECT_LAUNCH = (4, 264)
# Selection blocks scored per step in kernel 2: few steps, so few L2 round trips in sequence.
_BLOCKS_PER_STEP = 256
# Floats of kernel 1's partials that kernel 2 loads at once when merging (64 a thread at 4 warps).
_MERGE_ELEMENTS = 8192
# Score of a block that cannot be picked: below every importance (those are >= 0).
_UNAVAILABLE = -1.0


def _largest_power_of_two(n: int) -> int:
    """Largest power of two ``<= max(n, 1)``."""
    return pl.next_power_of_2(max(1, n) + 1) // 2


@dataclasses.dataclass(frozen=True)
class _StepGeometry:
    slots: int
    chunks: int
    tiles_per_chunk: int
    parts: int
    group: int
    dk: int
    dv: int
    block_length: int
    block_stride: int
    selection_block_size: int
    num_selected: int
    num_initial_blocks: int
    num_local_blocks: int
    scale: float
    dtype: str
    launch: tuple[int, int, int, int]
    select_launch: tuple[int, int]
    interpret: bool

    @property
    def tile(self) -> int:
        return self.launch[0]

    @property
    def rows(self) -> int:
        return padded(self.group)

    @property
    def dk_padded(self) -> int:
        return padded(self.dk)

    @property
    def dv_padded(self) -> int:
        return padded(self.dv)

    @property
    def dk_pieces(self) -> tuple[tuple[int, int], ...]:
        """``(offset, width)`` column pieces of ``Dk`` (:func:`column_pieces`: 192 = 128 + 64)."""
        return column_pieces(self.dk)

    @property
    def chunk(self) -> int:
        return self.tiles_per_chunk * self.tile

    @property
    def logits_length(self) -> int:
        return self.chunks * self.chunk

    @property
    def num_blocks(self) -> int:
        """Selection blocks that can hold a query: ``ceil(Tc * d / l')`` (``lengths <= Tc * d``)."""
        return -(-self.slots * self.block_stride // self.selection_block_size)

    @property
    def blocks_per_part(self) -> int:
        return padded(self.num_blocks) // self.parts

    @property
    def blocks_per_step(self) -> int:
        return min(_BLOCKS_PER_STEP, self.blocks_per_part)

    @property
    def merge_width(self) -> int:
        """Columns of the compressed output merged per load: ``[P, G', W]`` of at most
        ``_MERGE_ELEMENTS`` floats."""
        return min(self.dv_padded, _largest_power_of_two(_MERGE_ELEMENTS // (self.chunks * self.rows)))

    @property
    def merge_parts(self) -> int:
        """Programs of kernel 2 that each write an equal column slice of the compressed output."""
        return min(self.parts, self.dv_padded // self.merge_width)

    @property
    def picks_padded(self) -> int:
        return padded(self.num_selected)

    @property
    def precision(self) -> jax.lax.Precision | None:
        """Full float32 dots for float32 inputs (the Triton default would be TF32)."""
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None


def _visible_tokens(position: jax.Array, geo: _StepGeometry) -> jax.Array:
    """Compressed tokens visible at ``position``: ``floor((t - l) / d) + 1``, 0 before ``l - 1``."""
    ended = position - geo.block_length + 1
    return jnp.where(ended >= 0, jax.lax.div(ended, geo.block_stride) + 1, 0)


def _compressed_kernel(
    length_ref, q_ref, k_ref, v_ref, max_ref, sum_ref, acc_ref, logits_ref, count_ref, *, geo
):
    """One (chunk, KV head, sequence): ``q_ref [G', Dk']``, ``k_ref [Tc, Dk']``,
    ``v_ref [Tc, Dv']``; writes ``max_ref``/``sum_ref [G']`` (log2 units),
    ``acc_ref [G', Dv']``, ``logits_ref [G', chunk]`` and a zero to ``count_ref [1]``."""
    chunk = pl.program_id(0)
    visible = jnp.minimum(_visible_tokens(length_ref[0] - 1, geo), geo.slots)
    dv_cols = lanes(geo.dv, geo.dv_padded)
    head_rows = lanes(geo.group, geo.rows)
    piece_cols = [lanes(min(geo.dk - offset, width), width) for offset, width in geo.dk_pieces]
    q = [
        load(q_ref.at[:, pl.ds(offset, width)], tile_mask(head_rows, cols))
        for (offset, width), cols in zip(geo.dk_pieces, piece_cols, strict=True)
    ]
    first = chunk * geo.chunk
    offsets = jnp.arange(geo.tile)

    def body(i, carry):
        acc, row_max, row_sum = carry
        slots = first + i * geo.tile + offsets
        valid = slots < visible
        rows = pl.ds(first + i * geo.tile, geo.tile)
        k = [
            load(k_ref.at[rows, pl.ds(offset, width)], tile_mask(valid, cols))
            for (offset, width), cols in zip(geo.dk_pieces, piece_cols, strict=True)
        ]
        v = load(v_ref.at[rows, :], tile_mask(valid, dv_cols))
        s = dot_nt(q[0], k[0], geo.precision)
        for q_piece, k_piece in zip(q[1:], k[1:], strict=True):
            s = s + dot_nt(q_piece, k_piece, geo.precision)
        s = s * geo.scale
        logits_ref[:, pl.ds(i * geo.tile, geo.tile)] = s
        s2 = jnp.where(valid[None, :], s * LOG2E, MASKED)
        new_max = jnp.maximum(row_max, jnp.max(s2, axis=1))
        p = jnp.where(valid[None, :], jnp.exp2(s2 - new_max[:, None]), 0.0)
        alpha = jnp.exp2(row_max - new_max)
        row_sum = row_sum * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, geo.precision)
        return acc, new_max, row_sum

    # Tiles past the visible tokens are skipped; their logits stay unwritten and are never read.
    tiles = jnp.clip(jax.lax.div(visible - first + geo.tile - 1, geo.tile), 0, geo.tiles_per_chunk)
    init = (
        jnp.zeros((geo.rows, geo.dv_padded), jnp.float32),
        jnp.full((geo.rows,), MASKED, jnp.float32),
        jnp.zeros((geo.rows,), jnp.float32),
    )
    acc, row_max, row_sum = jax.lax.fori_loop(0, tiles, body, init)
    max_ref[...] = row_max
    sum_ref[...] = row_sum
    acc_ref[...] = acc
    count_ref[...] = jnp.zeros((1,), jnp.int32)


def _block_importance(geo: _StepGeometry, logits_ref, step, lse2, head_rows, visible) -> jax.Array:
    """Importance (Eqs. 9-10) of blocks ``step * J .. step * J + J - 1``: float32 ``[J]``."""
    first, weights = overlap_weights(geo.block_length, geo.block_stride, geo.selection_block_size)
    ratio = geo.selection_block_size // geo.block_stride
    blocks = step * geo.blocks_per_step + jnp.arange(geo.blocks_per_step)
    rows = jnp.arange(geo.rows)
    importance = jnp.zeros((geo.blocks_per_step,), jnp.float32)
    for k, weight in enumerate(weights):
        slot = blocks * ratio + (first + k)
        ok = (slot >= 0) & (slot < visible)
        mask = head_rows[:, None] & ok[None, :]
        s = plt.load(logits_ref.at[rows[:, None], jnp.where(ok, slot, 0)[None, :]], mask=mask, other=0)
        probs = jnp.where(mask, jnp.exp2(s * LOG2E - lse2[:, None]), 0.0)
        importance = importance + float(weight) * jnp.sum(probs, axis=0)
    return importance


def _merge_columns(geo: _StepGeometry, part, max_ref, acc_ref, out_ref, row_max, row_sum) -> None:
    """Writes columns ``[part * C, (part + 1) * C)`` of the merged compressed output, ``C =
    Dv' / merge_parts``, in slices of ``merge_width`` columns: one load of ``[P, G', W]`` each."""
    weights = jnp.exp2(max_ref[...] - row_max[None, :])
    norm = jnp.where(row_sum > 0, row_sum, 1.0)
    slices = geo.dv_padded // (geo.merge_parts * geo.merge_width)

    def merge(i, carry):
        first = (part * slices + i) * geo.merge_width
        columns = pl.ds(first, geo.merge_width)
        acc = jnp.sum(acc_ref[:, :, columns] * weights[:, :, None], axis=0)
        lane = first + jnp.arange(geo.merge_width)
        mask = tile_mask(lanes(geo.group, geo.rows), lane < geo.dv)
        store(out_ref.at[:, columns], acc / norm[:, None], mask)
        return carry

    jax.lax.fori_loop(0, slices, merge, 0)


def _pick_blocks(geo: _StepGeometry, importance: jax.Array, current) -> jax.Array:
    """Top ``n`` of ``importance [Nb']`` with the forced blocks (Eq. 11), sorted ascending
    with ``-1`` (unused) last: int32 ``[n']``."""
    blocks_padded = padded(geo.num_blocks)
    block = jnp.arange(blocks_padded)
    forced = (block < geo.num_initial_blocks) | (block > current - geo.num_local_blocks)
    score = jnp.where(block <= current, jnp.where(forced, jnp.inf, importance), _UNAVAILABLE)
    pick_lanes = jnp.arange(geo.picks_padded)

    def pick(i, carry):
        # One reduction per pick: argmax takes the lowest index among equal scores. Blocks
        # 0..current all score >= 0, so the first min(n, current + 1) picks are the real ones.
        score, picks = carry
        index = jnp.argmax(score).astype(jnp.int32)
        picks = jnp.where((pick_lanes == i) & (i <= current), index, picks)
        return jnp.where(block == index, _UNAVAILABLE, score), picks

    _, picks = jax.lax.fori_loop(
        0, geo.num_selected, pick, (score, jnp.full((geo.picks_padded,), -1, jnp.int32))
    )
    # Ascending, -1 last: the rank of a pick is the number of picks before it in that order.
    key = jnp.where(picks < 0, blocks_padded, picks)
    before = (key[None, :] < key[:, None]) | (
        (key[None, :] == key[:, None]) & (pick_lanes[None, :] < pick_lanes[:, None])
    )
    rank = jnp.sum(before.astype(jnp.int32), axis=1)
    return jnp.sum(jnp.where(rank[None, :] == pick_lanes[:, None], picks[None, :], 0), axis=1)


def _select_kernel(
    length_ref,
    max_ref,
    sum_ref,
    acc_ref,
    logits_ref,
    _count_in,
    out_ref,
    picks_ref,
    importance_ref,
    count_ref,
    *,
    geo,
):
    """One (part, KV head, sequence): partials ``max_ref``/``sum_ref [P, G']``,
    ``acc_ref [P, G', Dv']``, ``logits_ref [G', P*chunk]``; writes a column slice of
    ``out_ref [G', Dv']``, its blocks of ``importance_ref [Nb']`` and, in the program
    that draws the last ticket of ``count_ref [1]`` (aliased to ``_count_in``), ``picks_ref [n']``."""
    part = pl.program_id(0)
    position = length_ref[0] - 1
    visible = jnp.minimum(_visible_tokens(position, geo), geo.slots)
    head_rows = jnp.arange(geo.rows) < geo.group

    maxes = max_ref[...]
    row_max = jnp.max(maxes, axis=0)
    row_sum = jnp.sum(sum_ref[...] * jnp.exp2(maxes - row_max[None, :]), axis=0)

    nonempty = row_sum > 0
    # log2-sum-exp; with nothing visible every probability is masked, any finite value does.
    lse2 = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, row_sum, 1.0)) * LOG2E, 0.0)

    current = jax.lax.div(position, geo.selection_block_size)
    first_step = part * (geo.blocks_per_part // geo.blocks_per_step)
    first_block = first_step * geo.blocks_per_step

    def score_step(step, carry):
        scores = _block_importance(geo, logits_ref, first_step + step, lse2, head_rows, visible)
        importance_ref[pl.ds((first_step + step) * geo.blocks_per_step, geo.blocks_per_step)] = scores
        return carry

    # Steps wholly past the query's block are skipped, their blocks left unwritten: the pick masks them.
    steps = jnp.where(
        current >= first_block,
        jnp.minimum(
            jax.lax.div(current - first_block, geo.blocks_per_step) + 1,
            geo.blocks_per_part // geo.blocks_per_step,
        ),
        0,
    )
    jax.lax.fori_loop(0, steps, score_step, 0)
    if not geo.interpret:
        # Every thread's importance stores before the ticket (released by one thread).
        plt.debug_barrier()
    ticket = plt.atomic_add(count_ref, jnp.int32(0), jnp.int32(1))

    # After the ticket: the last part's pick does not read the merged output.
    @pl.when(part < geo.merge_parts)
    def _merge():
        _merge_columns(geo, part, max_ref, acc_ref, out_ref, row_max, row_sum)

    @pl.when(ticket == geo.parts - 1)
    def _pick():
        picks = _pick_blocks(geo, importance_ref[...], current)
        store(picks_ref, picks, lanes(geo.num_selected, geo.picks_padded))


def _geometry(
    q,
    k_cmp,
    v_cmp,
    launch: tuple[int, int, int, int] | None,
    select_launch: tuple[int, int] | None,
    **kwargs,
) -> _StepGeometry:
    batch, q_heads, dk = q.shape
    launch = _LAUNCH if launch is None else launch
    select_launch = _SELECT_LAUNCH if select_launch is None else select_launch
    if min(launch) < 1 or min(select_launch) < 1:
        raise ValueError(f"launch entries must be >= 1, got {launch} and {select_launch}")
    _, slots, kv_heads, dv = v_cmp.shape
    rows = batch * kv_heads
    tiles = -(-slots // launch[0])
    chunks = min(pl.next_power_of_2(tiles), _largest_power_of_two(launch[3] // rows))
    num_blocks = -(-slots * kwargs["block_stride"] // kwargs["selection_block_size"])
    parts = min(_largest_power_of_two(select_launch[1] // rows), padded(num_blocks) // 16)
    return _StepGeometry(
        slots=slots,
        chunks=chunks,
        tiles_per_chunk=-(-tiles // chunks),
        parts=parts,
        group=q_heads // kv_heads,
        dk=dk,
        dv=dv,
        dtype=jnp.dtype(q.dtype).name,
        launch=launch,
        select_launch=select_launch,
        **kwargs,
    )


_STATIC = (
    "block_length",
    "block_stride",
    "selection_block_size",
    "num_selected",
    "num_initial_blocks",
    "num_local_blocks",
    "scale",
    "launch",
    "select_launch",
    "interpret",
)


def _compressed_pass(geo: _StepGeometry, q, k_cmp, v_cmp, lengths):
    """Kernel 1: partials ``[B, H, P, G']`` (max, sum), ``[B, H, P, G', Dv']`` (acc),
    logits ``[B, H, G', P*chunk]`` and kernel 2's zeroed counters ``[B, H, 1]``."""
    batch, _, kv_heads, _ = k_cmp.shape
    q4 = q.reshape(batch, kv_heads, geo.group, geo.dk)
    partial = lambda *trailing: pl.BlockSpec(
        (None, None, None, *trailing), lambda p, h, b: (b, h, p, *(0,) * len(trailing))
    )
    shape = (batch, kv_heads, geo.chunks, geo.rows)
    return pl.pallas_call(
        functools.partial(_compressed_kernel, geo=geo),
        grid=(geo.chunks, kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, 1), lambda p, h, b: (b, 0)),
            pl.BlockSpec((None, None, geo.rows, geo.dk_padded), lambda p, h, b: (b, h, 0, 0)),
            pl.BlockSpec((None, geo.slots, None, geo.dk_padded), lambda p, h, b: (b, 0, h, 0)),
            pl.BlockSpec((None, geo.slots, None, geo.dv_padded), lambda p, h, b: (b, 0, h, 0)),
        ],
        out_specs=[
            partial(geo.rows),
            partial(geo.rows),
            partial(geo.rows, geo.dv_padded),
            pl.BlockSpec((None, None, geo.rows, geo.chunk), lambda p, h, b: (b, h, 0, p)),
            pl.BlockSpec((None, None, 1), lambda p, h, b: (b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct((*shape, geo.dv_padded), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.rows, geo.logits_length), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, 1), jnp.int32),
        ],
        compiler_params=plt.CompilerParams(num_warps=geo.launch[1], num_stages=geo.launch[2]),
        interpret=geo.interpret,
        name="nsa_decode_compressed",
    )(lengths[:, None], q4, k_cmp, v_cmp)


def _select_pass(geo: _StepGeometry, lengths, partials, out_dtype):
    """Kernel 2: compressed output ``[B, H, G, Dv]`` and sorted picks ``[B, H, n]``."""
    row_max, row_sum, acc, logits, counts = partials
    batch, kv_heads = row_max.shape[:2]
    per_head = lambda *block: pl.BlockSpec((None, None, *block), lambda q, h, b: (b, h, *(0,) * len(block)))
    out, picks, _, _ = pl.pallas_call(
        functools.partial(_select_kernel, geo=geo),
        grid=(geo.parts, kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, 1), lambda q, h, b: (b, 0)),
            per_head(geo.chunks, geo.rows),
            per_head(geo.chunks, geo.rows),
            per_head(geo.chunks, geo.rows, geo.dv_padded),
            per_head(geo.rows, geo.logits_length),
            per_head(1),
        ],
        out_specs=[
            per_head(geo.rows, geo.dv_padded),
            per_head(geo.picks_padded),
            per_head(padded(geo.num_blocks)),
            per_head(1),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, geo.group, geo.dv), out_dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.num_selected), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads, padded(geo.num_blocks)), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, 1), jnp.int32),
        ],
        input_output_aliases={5: 3},
        compiler_params=plt.CompilerParams(num_warps=geo.select_launch[0], num_stages=1),
        interpret=geo.interpret,
        name="nsa_decode_select",
    )(lengths[:, None], row_max, row_sum, acc, logits, counts)
    return out, picks


@functools.partial(jax.jit, static_argnames=_STATIC)
def compressed_pass(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    lengths: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
    launch: tuple[int, int, int, int] | None = None,
    select_launch: tuple[int, int] | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Kernel 1 alone, for timing its share of the step and tuning ``launch``; arguments as
    :func:`compressed_and_selection`. Returns the partials, logits and counters kernel 2 reads."""
    geo = _geometry(
        q,
        k_cmp,
        v_cmp,
        launch,
        select_launch,
        interpret=interpret,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=float(scale),
    )
    return tuple(_compressed_pass(geo, q, k_cmp, v_cmp, lengths.astype(jnp.int32)))


@functools.partial(jax.jit, static_argnames=_STATIC)
def compressed_and_selection(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    lengths: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
    launch: tuple[int, int, int, int] | None = None,
    select_launch: tuple[int, int] | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Compressed attention and top-n blocks of one decode step; see
    :func:`nsa_jax.decoding.compressed_and_selection_at`.

    Args:
      q: ``[B, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]``; lengths:
        int ``[B]`` in ``[1, Tc * d]``, the query of row ``b`` at ``lengths[b] - 1``.
      launch: kernel 1's ``(tile, num_warps, num_stages, target programs)``, ``None`` for
        the default; the compressed tokens of a row are split into
        the largest power-of-two number of chunks that keeps the programs at most the
        target (and no chunk empty).
      select_launch: kernel 2's ``(num_warps, target programs)``, ``None`` for the default;
        the selection blocks of a row are split into the largest power-of-two number of
        parts (of at least 16 blocks) that keeps the programs at most the target.
      interpret: run the kernels in Pallas interpret mode (CPU).

    Returns:
      ``(compressed [B, HQ, Dv]`` in ``q.dtype``, ``block_indices`` int32 ``[B, H, n])``:
      ascending, ``-1`` last.
    """
    geo = _geometry(
        q,
        k_cmp,
        v_cmp,
        launch,
        select_launch,
        interpret=interpret,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=float(scale),
    )
    lengths = lengths.astype(jnp.int32)
    partials = _compressed_pass(geo, q, k_cmp, v_cmp, lengths)
    out, picks = _select_pass(geo, lengths, partials, q.dtype)
    return out.reshape(q.shape[0], -1, geo.dv), picks


def check(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, lengths: jax.Array, **kwargs) -> None:
    """Raises ``ValueError`` for inputs these kernels do not serve (other dtypes, ``Tc = 0``)."""
    del v_cmp, lengths, kwargs
    require_supported_dtype(q)
    if k_cmp.shape[1] == 0:
        raise ValueError("k_cmp must hold at least one compressed token (axis 1) for pallas_triton")
