"""Block selection (spec, "Selection scores (Eqs. 8-10)" and Eq. 11) as a Pallas kernel, Triton lowering.

Layouts follow :func:`nsa_jax.select_blocks`: ``q [B, T, HQ, Dk]``, compressed keys
``k_cmp [B, Tc, H, Dk]`` in the slot layout of :mod:`nsa_jax.segments`, ``lse``
float32 ``[B, T, HQ]`` from the compressed attention. Internally ``q`` is viewed as
``[B, T, H, G, Dk]`` so that one program loads the ``G`` query heads of a KV head as
one tile (group-centric, as :mod:`pallas_kernels.gpu.selection`).

One program per (query position, KV head, batch), grid ``(T, H, B)`` (consecutive
programs share a KV head, so its compressed keys stay in L2). The program walks the
selection blocks up to the one holding the query, ``blocks_per_step`` at a time. For
each Eq. 9 offset ``k`` it gathers the compressed key that offset ``k`` of every block
of the step points at, recomputes ``p_cmp = exp(q . k_cmp * scale - lse)`` for the
``G`` heads, sums over the heads (Eq. 10) and adds ``weights[k] * p`` to the blocks'
importance. Each block's importance is thus the same sequence of operations as in the
reference (a sum over ``k`` of weighted group sums), so exact ties stay exact. A slot
is read ``len(weights) / (l'/d) < 2`` times.

The importance of all ``Nb = ceil(T / l')`` blocks stays in registers (``Nb'``
floats, ``Nb'`` the padded count); nothing of size ``[T, Tc]`` or ``[T, Nb]`` is
written. Top-n (Eq. 11): forced blocks score ``+inf``, blocks after the query's
block score below any importance, and ``n`` rounds of argmax (lowest index on ties,
as ``lax.top_k``) pick the blocks; a round whose best is not visible yields ``-1``.
The ``n`` picks per (query, KV head) are the only output (``[B, T, H, n']`` int32,
linear in ``T``); they are sorted ascending in XLA afterwards.

Memory: per program, registers for the ``[Nb']`` importance, the ``[G', Dk']`` query
tile, one ``[J, Dk']`` gathered key tile and the ``[G', J]`` logits (``G'``, ``Dk'``,
``J`` padded to powers of two, ``J = min(32, Nb')``); in HBM only the inputs, the
segment starts ``[B, T]`` and the picks ``[B, T, H, n']``: linear in ``T``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from nsa_jax.reference.selection import ascending_unused_last, overlap_weights
from nsa_jax.segments import segment_starts
from pallas_kernels.gpu.tiles import (
    dot_nt,
    lanes,
    load,
    padded,
    per_query_block,
    require_supported_dtype,
    tile_mask,
)

# Selection blocks scored per step: rows of the gathered key tile (>= 16 for tl.dot).
_BLOCKS_PER_STEP = 32
# Score of a block that cannot be picked: below every importance (those are >= 0).
_UNAVAILABLE = -1.0


@dataclasses.dataclass(frozen=True)
class _Geometry:
    length: int
    slots: int
    group: int
    dk: int
    block_length: int
    block_stride: int
    selection_block_size: int
    num_selected: int
    num_initial_blocks: int
    num_local_blocks: int
    scale: float
    dtype: str

    @property
    def rows(self) -> int:
        return padded(self.group)

    @property
    def dk_padded(self) -> int:
        return padded(self.dk)

    @property
    def num_blocks(self) -> int:
        return -(-self.length // self.selection_block_size)

    @property
    def blocks_padded(self) -> int:
        return padded(self.num_blocks)

    @property
    def blocks_per_step(self) -> int:
        return min(_BLOCKS_PER_STEP, self.blocks_padded)

    @property
    def steps(self) -> int:
        """Rows of the ``[steps, blocks_per_step]`` importance tile."""
        return self.blocks_padded // self.blocks_per_step

    @property
    def picks_padded(self) -> int:
        return padded(self.num_selected)

    @property
    def precision(self) -> jax.lax.Precision | None:
        """Full float32 dots for float32 inputs (the Triton default would be TF32)."""
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None


def _step_importance(geo: _Geometry, k_ref, step, q, lse, head_rows, start, query) -> jax.Array:
    """Importance (Eqs. 9-10) of blocks ``step * J .. step * J + J - 1``: float32 ``[J]``.

    ``k_ref [Tc, Dk']`` holds the compressed keys of this (batch, KV head); ``q [rows, Dk']``
    and ``lse [rows]`` the group's queries; ``start`` the query's segment start ``s0``.
    """
    first, weights = overlap_weights(geo.block_length, geo.block_stride, geo.selection_block_size)
    ratio = geo.selection_block_size // geo.block_stride
    base = jax.lax.div(start + geo.block_stride - 1, geo.block_stride)
    blocks = step * geo.blocks_per_step + jnp.arange(geo.blocks_per_step)
    dk_lanes = jnp.arange(geo.dk_padded)
    dk_cols = dk_lanes < geo.dk
    importance = jnp.zeros((geo.blocks_per_step,), jnp.float32)
    for k, weight in enumerate(weights):
        # Token ``relative`` of the query's segment lives in slot ``base + relative``; it
        # is visible once its l raw keys have ended (spec, Eqs. 7-8).
        relative = blocks * ratio + (first + k)
        slot = base + relative
        visible = (
            (relative >= 0)
            & (start + relative * geo.block_stride + geo.block_length - 1 <= query)
            & (slot < geo.slots)
        )
        keys = plt.load(
            k_ref.at[jnp.where(visible, slot, 0)[:, None], dk_lanes[None, :]],
            mask=visible[:, None] & dk_cols[None, :],
            other=0,
        )
        logits = dot_nt(q, keys, geo.precision) * geo.scale
        probs = jnp.where(head_rows[:, None] & visible[None, :], jnp.exp(logits - lse[:, None]), 0.0)
        importance = importance + float(weight) * jnp.sum(probs, axis=0)
    return importance


def _kernel(start_ref, q_ref, lse_ref, k_ref, out_ref, *, geo: _Geometry):
    """One query ``t`` and one KV head: ``q_ref [rows, Dk']``, ``lse_ref [rows]``,
    ``k_ref [Tc, Dk']``, ``start_ref [1]`` (segment start), ``out_ref [n']`` (picks)."""
    query = pl.program_id(0)
    start = start_ref[0]
    head_rows = jnp.arange(geo.rows) < geo.group
    q = load(q_ref, tile_mask(lanes(geo.group, geo.rows), lanes(geo.dk, geo.dk_padded)))
    lse = load(lse_ref, lanes(geo.group, geo.rows))
    # As the reference: a non-finite lse (-inf: nothing visible, every p masked) reads as 0.
    lse = jnp.where(jnp.abs(lse) < jnp.inf, lse, 0.0)
    current = jax.lax.div(query - start, geo.selection_block_size)
    step_rows = jnp.arange(geo.steps)[:, None]

    def score_step(step, importance):
        scores = _step_importance(geo, k_ref, step, q, lse, head_rows, start, query)
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

    def pick(i, carry):
        score, picks = carry
        best = jnp.max(jnp.max(score, axis=1), axis=0)
        index = jnp.min(jnp.min(jnp.where(score == best, block, geo.blocks_padded), axis=1), axis=0)
        picks = jnp.where((pick_lanes == i) & (best >= 0), index, picks)
        return jnp.where(block == index, _UNAVAILABLE, score), picks

    init = (score, jnp.full((geo.picks_padded,), -1, jnp.int32))
    _, picks = jax.lax.fori_loop(0, geo.num_selected, pick, init)
    out_ref[...] = picks


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_length",
        "block_stride",
        "selection_block_size",
        "num_selected",
        "num_initial_blocks",
        "num_local_blocks",
        "scale",
        "interpret",
    ),
)
def select_blocks(
    q: jax.Array,
    k_cmp: jax.Array,
    lse: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Top-n selection blocks with a Pallas kernel; see :func:`nsa_jax.select_blocks`.

    Args:
      q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]`` (slot layout, ``1 <= Tc <= ceil(T/d)``),
        same float dtype; lse: float32 ``[B, T, HQ]`` from the compressed attention.
      block_length, block_stride, selection_block_size: ``l``, ``d``, ``l'``.
      num_selected, num_initial_blocks, num_local_blocks: ``n`` and the forced blocks.
      scale: logit scale; segment_ids: int ``[B, T]`` or ``None``.
      interpret: run the kernel in Pallas interpret mode (CPU).

    Returns:
      int32 ``[B, T, H, n]``: blocks counted from the segment start, ascending, ``-1``
      (unused slots) last. Carries no gradient.
    """
    batch, length, q_heads, dk = q.shape
    kv_heads = k_cmp.shape[2]
    geo = _Geometry(
        length=length,
        slots=k_cmp.shape[1],
        group=q_heads // kv_heads,
        dk=dk,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=float(scale),
        dtype=jnp.dtype(q.dtype).name,
    )
    q5 = jax.lax.stop_gradient(q).reshape(batch, length, kv_heads, geo.group, dk)
    lse4 = jax.lax.stop_gradient(lse).astype(jnp.float32).reshape(batch, length, kv_heads, geo.group)
    k_cmp = jax.lax.stop_gradient(k_cmp)
    starts = segment_starts(segment_ids, batch, length)[:, :, None]
    picks = pl.pallas_call(
        functools.partial(_kernel, geo=geo),
        grid=(length, kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, None, 1), lambda t, h, b: (b, t, 0)),
            per_query_block(geo.rows, geo.dk_padded),
            per_query_block(geo.rows),
            pl.BlockSpec((None, geo.slots, None, geo.dk_padded), lambda t, h, b: (b, 0, h, 0)),
        ],
        out_specs=per_query_block(geo.picks_padded),
        out_shape=jax.ShapeDtypeStruct((batch, length, kv_heads, geo.picks_padded), jnp.int32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="nsa_select_blocks",
    )(starts, q5, lse4, k_cmp)
    return ascending_unused_last(picks[..., :num_selected])


def check(
    q: jax.Array,
    k_cmp: jax.Array,
    lse: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> None:
    """Raises ``ValueError`` for inputs this kernel does not serve (other dtypes, ``Tc = 0``)."""
    del lse, block_length, block_stride, selection_block_size, num_selected
    del num_initial_blocks, num_local_blocks, scale, segment_ids
    require_supported_dtype(q)
    if k_cmp.shape[1] == 0:
        raise ValueError("k_cmp must hold at least one compressed token (axis 1) for pallas_triton")
