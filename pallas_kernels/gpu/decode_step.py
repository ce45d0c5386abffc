"""Compressed attention and block selection of one decode step as two Pallas kernels (Triton lowering).

Spec, "Decoding", "Compression branch (Eqs. 7-8)", "Selection scores (Eqs. 8-10)" and
Eq. 11, for one query per sequence at position ``t = lengths - 1`` (no segments: the
decode cache holds one sequence per row).

Kernel 1 (``nsa_decode_compressed``), grid ``(P, H, B)``: the ``Tc`` compressed tokens
of a (sequence, KV head) are split into ``P`` chunks (flash-decoding style) so that
``P * H * B`` programs fill the GPU even at batch 1. A program loads the ``G`` query
heads of its group as one ``[G', Dk']`` tile, streams its chunk ``tile`` tokens at a
time and writes an unnormalised partial ``(max, sum, acc)`` of the compressed attention
plus the scaled logits ``q . k_cmp * scale`` of its tokens (float32 ``[B, H, G', P*chunk]``,
``Tc * G`` floats per row: 1/4 (Dk=128) to 1/6 (Dk=192) of the compressed keys' bytes).

Kernel 2 (``nsa_decode_select``), grid ``(H, B)``: merges the ``P`` partials into the
compressed output and the log-sum-exp, then scores the selection blocks from the
stored logits exactly as :mod:`pallas_kernels.gpu.select_blocks` does from recomputed
ones (``p = exp(s - lse)``, Eq. 9 weights, group sum of Eq. 10), and picks the top
``n`` with the forced blocks (Eq. 11; lowest index on ties, as ``lax.top_k``). Each
block's importance is a function of its own logits and the per-head ``lse`` only (not
of the chunking), so exact ties stay exact. The picks are sorted ascending with the
unused slots (``-1``) last in the kernel (rank by pairwise comparison of ``n'`` picks).

Two launches and no host sync (with :mod:`pallas_kernels.gpu.decode` for the selected
and window reads, three kernels and XLA's merge of that kernel's partials make a decode
step). Besides the inputs, HBM traffic is the logits (written once, read at most
``len(weights) / (l'/d) < 2`` times per visible token) and the ``[B, H, P, G', Dv']``
partials, which kernel 2 merges ``_MERGE_UNROLL`` at a time (its loops are not
software-pipelined, so each step issues several loads at once).
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
# and the programs to aim for (every SM of an H100/H200, 132, busy twice over); by key head
# dim, the fastest of the H200 sweep at B=16, S=64K (experiments/results/decode_h200.md).
_LAUNCH = (64, 4, 2, 264)
_LAUNCH_BY_DK = {128: (128, 8, 2, 264), 192: (128, 4, 2, 264)}
# Selection blocks scored per step in kernel 2: few steps, so few L2 round trips in sequence.
_BLOCKS_PER_STEP = 256
# Partials of kernel 1 that kernel 2 loads per merge step.
_MERGE_UNROLL = 8
# Score of a block that cannot be picked: below every importance (those are >= 0).
_UNAVAILABLE = -1.0


@dataclasses.dataclass(frozen=True)
class _StepGeometry:
    slots: int
    chunks: int
    tiles_per_chunk: int
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
    def blocks_per_step(self) -> int:
        return min(_BLOCKS_PER_STEP, padded(self.num_blocks))

    @property
    def steps(self) -> int:
        return padded(self.num_blocks) // self.blocks_per_step

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


def _compressed_kernel(length_ref, q_ref, k_ref, v_ref, max_ref, sum_ref, acc_ref, logits_ref, *, geo):
    """One (chunk, KV head, sequence): ``q_ref [G', Dk']``, ``k_ref [Tc, Dk']``,
    ``v_ref [Tc, Dv']``; writes ``max_ref``/``sum_ref [G']`` (log2 units),
    ``acc_ref [G', Dv']`` and ``logits_ref [G', chunk]``."""
    chunk = pl.program_id(0)
    visible = jnp.minimum(_visible_tokens(length_ref[0] - 1, geo), geo.slots)
    dk_cols, dv_cols = lanes(geo.dk, geo.dk_padded), lanes(geo.dv, geo.dv_padded)
    q = load(q_ref, tile_mask(lanes(geo.group, geo.rows), dk_cols))
    first = chunk * geo.chunk
    offsets = jnp.arange(geo.tile)

    def body(i, carry):
        acc, row_max, row_sum = carry
        slots = first + i * geo.tile + offsets
        valid = slots < visible
        rows = pl.ds(first + i * geo.tile, geo.tile)
        k = load(k_ref.at[rows, :], tile_mask(valid, dk_cols))
        v = load(v_ref.at[rows, :], tile_mask(valid, dv_cols))
        s = dot_nt(q, k, geo.precision) * geo.scale
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


def _select_kernel(length_ref, max_ref, sum_ref, acc_ref, logits_ref, out_ref, picks_ref, *, geo):
    """One (KV head, sequence): partials ``max_ref``/``sum_ref [P, G']``, ``acc_ref [P, G', Dv']``,
    ``logits_ref [G', P*chunk]``; writes ``out_ref [G', Dv']`` and ``picks_ref [n']``."""
    position = length_ref[0] - 1
    visible = jnp.minimum(_visible_tokens(position, geo), geo.slots)
    head_rows = jnp.arange(geo.rows) < geo.group

    row_max = jnp.max(max_ref[...], axis=0)
    # This loop is not software-pipelined: each step issues several partials' loads at once.
    unroll = min(geo.chunks, _MERGE_UNROLL)

    def merge(i, carry):
        acc, row_sum = carry
        for u in range(unroll):
            part = i * unroll + u
            weight = jnp.exp2(max_ref[part, :] - row_max)
            row_sum = row_sum + sum_ref[part, :] * weight
            acc = acc + acc_ref[part, :, :] * weight[:, None]
        return acc, row_sum

    init = (jnp.zeros((geo.rows, geo.dv_padded), jnp.float32), jnp.zeros((geo.rows,), jnp.float32))
    acc, row_sum = jax.lax.fori_loop(0, geo.chunks // unroll, merge, init)
    nonempty = row_sum > 0
    out = acc / jnp.where(nonempty, row_sum, 1.0)[:, None]
    store(out_ref, out, tile_mask(lanes(geo.group, geo.rows), lanes(geo.dv, geo.dv_padded)))
    # log2-sum-exp; with nothing visible every probability is masked, any finite value does.
    lse2 = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, row_sum, 1.0)) * LOG2E, 0.0)

    current = jax.lax.div(position, geo.selection_block_size)
    step_rows = jnp.arange(geo.steps)[:, None]

    def score_step(step, importance):
        scores = _block_importance(geo, logits_ref, step, lse2, head_rows, visible)
        return jnp.where(step_rows == step, scores[None, :], importance)

    importance = jax.lax.fori_loop(
        0,
        jax.lax.div(current, geo.blocks_per_step) + 1,
        score_step,
        jnp.zeros((geo.steps, geo.blocks_per_step), jnp.float32),
    )
    block = step_rows * geo.blocks_per_step + jnp.arange(geo.blocks_per_step)[None, :]
    forced = (block < geo.num_initial_blocks) | (block > current - geo.num_local_blocks)
    score = jnp.where(block <= current, jnp.where(forced, jnp.inf, importance), _UNAVAILABLE)
    pick_lanes = jnp.arange(geo.picks_padded)
    blocks_padded = geo.steps * geo.blocks_per_step

    def pick(i, carry):
        score, picks = carry
        best = jnp.max(jnp.max(score, axis=1), axis=0)
        index = jnp.min(jnp.min(jnp.where(score == best, block, blocks_padded), axis=1), axis=0)
        picks = jnp.where((pick_lanes == i) & (best >= 0), index, picks)
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
    ordered = jnp.sum(jnp.where(rank[None, :] == pick_lanes[:, None], picks[None, :], 0), axis=1)
    store(picks_ref, ordered, lanes(geo.num_selected, geo.picks_padded))


def _geometry(q, k_cmp, v_cmp, launch: tuple[int, int, int, int] | None, **kwargs) -> _StepGeometry:
    batch, q_heads, dk = q.shape
    launch = _LAUNCH_BY_DK.get(dk, _LAUNCH) if launch is None else launch
    _, slots, kv_heads, dv = v_cmp.shape
    rows = batch * kv_heads
    tiles = -(-slots // launch[0])
    chunks = min(pl.next_power_of_2(tiles), pl.next_power_of_2(max(1, launch[3] // rows) + 1) // 2)
    return _StepGeometry(
        slots=slots,
        chunks=chunks,
        tiles_per_chunk=-(-tiles // chunks),
        group=q_heads // kv_heads,
        dk=dk,
        dv=dv,
        dtype=jnp.dtype(q.dtype).name,
        launch=launch,
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
    "interpret",
)


def _compressed_pass(geo: _StepGeometry, q, k_cmp, v_cmp, lengths, interpret: bool):
    """Kernel 1: partials ``[B, H, P, G']`` (max, sum), ``[B, H, P, G', Dv']`` (acc) and
    logits ``[B, H, G', P*chunk]``."""
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
        ],
        out_shape=[
            jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct((*shape, geo.dv_padded), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.rows, geo.logits_length), jnp.float32),
        ],
        compiler_params=plt.CompilerParams(num_warps=geo.launch[1], num_stages=geo.launch[2]),
        interpret=interpret,
        name="nsa_decode_compressed",
    )(lengths[:, None], q4, k_cmp, v_cmp)


def _select_pass(geo: _StepGeometry, lengths, partials, out_dtype, interpret: bool):
    """Kernel 2: compressed output ``[B, H, G, Dv]`` and sorted picks ``[B, H, n]``."""
    row_max, row_sum, acc, logits = partials
    batch, kv_heads = row_max.shape[:2]
    per_head = lambda *block: pl.BlockSpec((None, None, *block), lambda h, b: (b, h, *(0,) * len(block)))
    return pl.pallas_call(
        functools.partial(_select_kernel, geo=geo),
        grid=(kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, 1), lambda h, b: (b, 0)),
            per_head(geo.chunks, geo.rows),
            per_head(geo.chunks, geo.rows),
            per_head(geo.chunks, geo.rows, geo.dv_padded),
            per_head(geo.rows, geo.logits_length),
        ],
        out_specs=[per_head(geo.rows, geo.dv_padded), per_head(geo.picks_padded)],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, geo.group, geo.dv), out_dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.num_selected), jnp.int32),
        ],
        compiler_params=plt.CompilerParams(num_warps=8, num_stages=1),
        interpret=interpret,
        name="nsa_decode_select",
    )(lengths[:, None], row_max, row_sum, acc, logits)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "launch"))
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
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Kernel 1 alone, for timing its share of the step and tuning ``launch`` (``(tile,
    num_warps, num_stages, target programs)``); other arguments as :func:`compressed_and_selection`.
    Returns the partials and logits kernel 2 reads."""
    geo = _geometry(
        q,
        k_cmp,
        v_cmp,
        launch=launch,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=float(scale),
    )
    return tuple(_compressed_pass(geo, q, k_cmp, v_cmp, lengths.astype(jnp.int32), interpret))


@functools.partial(jax.jit, static_argnames=(*_STATIC, "launch"))
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
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Compressed attention and top-n blocks of one decode step; see
    :func:`nsa_jax.decoding.compressed_and_selection_at`.

    Args:
      q: ``[B, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]``; lengths:
        int ``[B]`` in ``[1, Tc * d]``, the query of row ``b`` at ``lengths[b] - 1``.
      launch: kernel 1's ``(tile, num_warps, num_stages, target programs)``, ``None`` for
        the tuned one of the key head dim; the compressed tokens of a row are split into
        the largest power-of-two number of chunks that keeps the programs at most the
        target (and no chunk empty).
      interpret: run the kernels in Pallas interpret mode (CPU).

    Returns:
      ``(compressed [B, HQ, Dv]`` in ``q.dtype``, ``block_indices`` int32 ``[B, H, n])``:
      ascending, ``-1`` last.
    """
    geo = _geometry(
        q,
        k_cmp,
        v_cmp,
        launch=launch,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=float(scale),
    )
    lengths = lengths.astype(jnp.int32)
    partials = _compressed_pass(geo, q, k_cmp, v_cmp, lengths, interpret)
    out, picks = _select_pass(geo, lengths, partials, q.dtype, interpret)
    return out.reshape(q.shape[0], -1, geo.dv), picks


def check(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, lengths: jax.Array, **kwargs) -> None:
    """Raises ``ValueError`` for inputs these kernels do not serve (other dtypes, ``Tc = 0``)."""
    del v_cmp, lengths, kwargs
    require_supported_dtype(q)
    if k_cmp.shape[1] == 0:
        raise ValueError("k_cmp must hold at least one compressed token (axis 1) for pallas_triton")
