"""Top-n selection blocks (spec, Eq. 11) from importances already in memory, a Pallas Triton kernel.

The second half of :func:`pallas_kernels.gpu.block_importance_mosaic.select_blocks`: importances
``[B, T, H, Nb]`` in, picks ``[B, T, H, n]`` out, as :func:`nsa_jax.reference.selection.top_blocks`
(ties to the lower block, ``-1`` last); XLA's ``lax.top_k`` on them took 26 ms at T = 64K, H = 4 on
the H200, this kernel 1.2-1.7 ms. Positions are launched in ranges by how many blocks they can see
(``TopNTuning.narrowest``, doubling), each range over a row of that many blocks. One program per
``P`` positions of one KV head loads their visible importances (``[P, Nb']``, ``Nb' =
next_pow2(Nb)`` of the range; blocks past a position's own are never read) and runs the top-n of
the Triton selection kernel (:func:`_top_n_direct`, which the scoring kernel of
:mod:`pallas_kernels.gpu.select_blocks` also runs on its register tile: forced blocks placed
directly, then ``n - n_f`` rounds of arg-max), then sorts the picks by rank
(:func:`_ascending_unused_last`). Unsegmented (block numbers from 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gpu.tiles import padded

# Score of a block that cannot be picked: below every importance (those are >= 0).
_UNAVAILABLE = -1.0


@dataclasses.dataclass(frozen=True)
class TopNTuning:
    """``positions`` a program (``P``, a power of two), Triton ``warps``, the arg-max ``view``
    (``"lanes"`` or ``"flat"``, see :func:`_top_n_direct`), and the ``narrowest`` row of blocks a
    launch takes: positions are launched in ranges by the blocks they can see, ``narrowest``,
    twice that, and so on (a power of two), so that early positions do not scan the late blocks.
    The defaults: H200, T = 64K, H = 4 (experiments/results/bench_importance_session28_h200.md):
    1.25 / 1.36 ms (Dk = 128 / 192 scores), against 1.35 / 1.42 for one position a warp in the
    lanes view, 2.05 / 2.10 for 4 positions of 4 warps, and 2.24 / 2.29 for that launch without
    ranges (one row of all 1024 blocks)."""

    positions: int = 2
    warps: int = 1
    view: str = "flat"
    narrowest: int = 32

    def __post_init__(self) -> None:
        if self.positions < 1 or self.positions & (self.positions - 1):
            raise ValueError(f"positions must be a power of two, got {self.positions}")
        if self.warps < 1:
            raise ValueError(f"warps must be positive, got {self.warps}")
        if self.narrowest < 1 or self.narrowest & (self.narrowest - 1):
            raise ValueError(f"narrowest must be a power of two, got {self.narrowest}")
        if self.view not in ("lanes", "flat"):
            raise ValueError(f"view must be 'lanes' or 'flat', got {self.view!r}")


class TopNShape:
    """What the top-n reads of a kernel's geometry, the base of this module's and of the Triton
    scoring kernel's: ``P = positions`` rows of ``Nb' = blocks_padded`` importances, ``n`` picks
    (``n' = picks_padded`` lanes), ``n_f = forced_blocks`` of them forced."""

    positions: int
    blocks_padded: int
    num_selected: int
    num_initial_blocks: int
    num_local_blocks: int

    @property
    def forced_blocks(self) -> int:
        """``n_f``: initial plus local blocks."""
        return self.num_initial_blocks + self.num_local_blocks

    @property
    def picks_padded(self) -> int:
        return padded(self.num_selected)


@dataclasses.dataclass(frozen=True)
class _Shape(TopNShape):
    """The standalone kernel's :class:`TopNShape`."""

    positions: int
    num_blocks: int
    num_selected: int
    num_initial_blocks: int
    num_local_blocks: int

    @property
    def blocks_padded(self) -> int:
        return max(pl.next_power_of_2(self.num_blocks), 1)


def _ascending_unused_last(picks: jax.Array, unused: int) -> jax.Array:
    """``[P, n']`` distinct blocks and ``-1`` sorted ascending with ``-1`` last (as
    :func:`nsa_jax.reference.selection.ascending_unused_last`): each entry goes to its rank,
    ties (the ``-1``) ranked by lane. ``unused`` exceeds every block."""
    lanes = picks.shape[1]
    key = jnp.where(picks < 0, unused, picks)
    lane_i = jnp.arange(lanes)[None, :, None]
    lane_j = jnp.arange(lanes)[None, None, :]
    mine, other = key[:, :, None], key[:, None, :]
    before = (other < mine) | ((other == mine) & (lane_j < lane_i))
    rank = jnp.sum(before.astype(jnp.int32), axis=2)
    ordered = jnp.min(jnp.where(rank[:, :, None] == lane_j, key[:, :, None], unused), axis=1)
    return jnp.where(ordered >= unused, -1, ordered)


def _top_n_argmax(score: jax.Array, current: jax.Array, geo: TopNShape) -> jax.Array:
    """Eq. 11 on ``score [P, Nb']`` (importances): forced blocks score ``+inf``, then ``n`` rounds
    of arg-max over each whole row. Returns the picks ``[P, n']``, ``-1`` for none."""
    block = jnp.arange(geo.blocks_padded)[None, :]
    here = current[:, None]
    forced = (block < geo.num_initial_blocks) | (block > here - geo.num_local_blocks)
    score = jnp.where(block <= here, jnp.where(forced, jnp.inf, score), _UNAVAILABLE)
    pick_lane = jnp.arange(geo.picks_padded)[None, :]

    def pick(i, carry):
        score, picks = carry
        # argmax takes the lowest index among equal maxima, as lax.top_k. The current + 1
        # visible blocks all score >= 0 > _UNAVAILABLE: pick i is real while i <= current.
        index = jnp.argmax(score, axis=1).astype(jnp.int32)
        picks = jnp.where((pick_lane == i) & (i <= current)[:, None], index[:, None], picks)
        return jnp.where(block == index[:, None], _UNAVAILABLE, score), picks

    init = (score, jnp.full((geo.positions, geo.picks_padded), -1, jnp.int32))
    return jax.lax.fori_loop(0, geo.num_selected, pick, init)[1]


def _top_n_direct(score: jax.Array, current: jax.Array, geo: TopNShape, view: str) -> jax.Array:
    """Eq. 11 on ``score [P, Nb']``: the forced blocks (``n_f = n_init + n_local <= n`` of them,
    fewer only when every visible block is forced) take the first picks directly, then ``n - n_f``
    rounds of arg-max (the maximum, then the lowest block holding it, as ``lax.top_k``) rank the
    rest. ``view``: ``"flat"`` reduces each row ``[P, Nb']`` as it is laid out (with ``quads`` the
    blocks of a position lie in one warp); ``"lanes"`` first views it as ``[A, P, L]`` (block ``a * L
    + lane``, ``L = min(32, Nb')``), which Triton lays out with ``P`` over warps and ``L`` over lanes.
    Returns ``[P, W]`` picks (``W >= n'``), ``-1`` for none."""
    P, lanes = geo.positions, min(32, geo.blocks_padded)
    if view == "lanes":
        rows = geo.blocks_padded // lanes
        score = jnp.transpose(score.reshape(P, rows, lanes), (1, 0, 2))
        row = jnp.arange(rows)[:, None, None]
        lane = jnp.arange(lanes)[None, None, :]
        block = row * lanes + lane
        here = current[None, :, None]
    else:
        block = jnp.arange(geo.blocks_padded)[None, :]
        here = current[:, None]
    forced = (block < geo.num_initial_blocks) | (block > here - geo.num_local_blocks)
    score = jnp.where((block <= here) & ~forced, score, _UNAVAILABLE)

    width = max(geo.picks_padded, lanes) if view == "lanes" else geo.picks_padded
    slot = jnp.arange(width)[None, :]
    here = current[:, None]
    local = here - (slot - geo.num_initial_blocks)
    picks = jnp.where(
        slot < geo.num_initial_blocks,
        jnp.where(slot <= here, slot, -1),
        jnp.where((slot < geo.forced_blocks) & (local >= geo.num_initial_blocks), local, -1),
    )

    def pick(i, carry):
        score, picks = carry
        if view == "lanes":
            best = jnp.max(jnp.max(score, axis=0), axis=1)
            first_row = jnp.min(jnp.where(score == best[None, :, None], row, rows), axis=0)
            index = jnp.min(
                jnp.where(first_row < rows, first_row * lanes + lane[0], geo.blocks_padded), axis=1
            )
            taken = block == index[None, :, None]
        else:
            best = jnp.max(score, axis=1)
            index = jnp.min(jnp.where(score == best[:, None], block, geo.blocks_padded), axis=1)
            taken = block == index[:, None]
        found = best > _UNAVAILABLE
        picks = jnp.where((slot == geo.forced_blocks + i) & found[:, None], index[:, None], picks)
        return jnp.where(taken, _UNAVAILABLE, score), picks

    return jax.lax.fori_loop(0, geo.num_selected - geo.forced_blocks, pick, (score, picks))[1]


def _kernel(
    importance_ref,
    out_ref,
    *,
    shape: _Shape,
    first: int,
    stop: int,
    rows_first: int,
    selection_block_size: int,
    view: str,
):
    """``importance_ref [rows, Nb]`` (row ``i`` is position ``rows_first + i``) and ``out_ref
    [stop - first, n']`` of one KV head: positions ``first .. stop - 1``, whose blocks lie below
    ``shape.num_blocks``."""
    P = shape.positions
    position = first + pl.program_id(0) * P + jnp.arange(P)
    live = position < stop
    position = jnp.where(live, position, first)
    current = jax.lax.div(position, selection_block_size)
    block = jnp.arange(shape.blocks_padded)[None, :]
    seen = live[:, None] & (block <= current[:, None]) & (block < shape.num_blocks)
    score = plt.load(
        importance_ref.at[position[:, None] - rows_first, jnp.minimum(block, shape.num_blocks - 1)],
        mask=seen,
        other=_UNAVAILABLE,
    )
    if shape.num_selected < shape.forced_blocks:
        picks = _top_n_argmax(score, current, shape)
    else:
        picks = _top_n_direct(score, current, shape, view)
    picks = _ascending_unused_last(picks, shape.blocks_padded)
    # Dead positions and lanes past n' store out of range (masked), as the selection kernel.
    target = jnp.where(live, position - first, stop - first)
    lane = jnp.arange(picks.shape[1])[None, :]
    plt.store(out_ref.at[target[:, None], lane], picks, mask=live[:, None] & (lane < shape.picks_padded))


def position_ranges(
    length: int, num_blocks: int, selection_block_size: int, narrowest: int
) -> list[tuple[int, int, int]]:
    """``(first, stop, blocks)``: positions ``first .. stop - 1`` see at most ``blocks`` blocks, a
    power of two from ``narrowest`` on (doubling with each range), or ``num_blocks``."""
    ranges, first, width = [], 0, narrowest
    while first < length:
        stop = length if width >= num_blocks else min(length, width * selection_block_size)
        ranges.append((first, stop, min(width, num_blocks)))
        first, width = stop, 2 * width
    return ranges


def _check_importance(importance: jax.Array) -> None:
    if importance.ndim != 4 or importance.dtype != jnp.float32:
        raise ValueError(
            f"importance must be float32 [B, T, H, Nb], got {importance.dtype} of shape {importance.shape}"
        )


def top_blocks_of_range(
    importance: jax.Array,
    *,
    first: int,
    stop: int,
    blocks: int,
    rows_first: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    interpret: bool,
    tuning: TopNTuning,
) -> jax.Array:
    """Eq. 11 for positions ``first .. stop - 1``, which see at most ``blocks`` blocks, from
    ``importance`` float32 ``[B, R, H, Nb]`` whose row ``i`` is position ``rows_first + i``:
    int32 ``[B, stop - first, H, n]`` (one launch)."""
    _check_importance(importance)
    batch, rows, heads, num_blocks = importance.shape
    if not rows_first <= first < stop <= rows_first + rows:
        raise ValueError(
            f"positions first={first} .. stop={stop} must be rows of importance, positions "
            f"{rows_first} .. {rows_first + rows}"
        )
    # A chunk's importances may be narrower than its range's blocks; its positions see no further.
    shape = _Shape(
        tuning.positions, min(blocks, num_blocks), num_selected, num_initial_blocks, num_local_blocks
    )
    kernel = functools.partial(
        _kernel,
        shape=shape,
        first=first,
        stop=stop,
        rows_first=rows_first,
        selection_block_size=selection_block_size,
        view=tuning.view,
    )
    return pl.pallas_call(
        kernel,
        grid=(-(-(stop - first) // tuning.positions), heads, batch),
        in_specs=[pl.BlockSpec((None, rows, None, num_blocks), lambda x, h, b: (b, 0, h, 0))],
        out_specs=pl.BlockSpec((None, stop - first, None, shape.picks_padded), lambda x, h, b: (b, 0, h, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, stop - first, heads, shape.picks_padded), jnp.int32),
        compiler_params=plt.CompilerParams(num_warps=tuning.warps, num_stages=1),
        interpret=interpret,
        name="nsa_top_n",
    )(importance)[..., :num_selected]


@functools.partial(
    jax.jit,
    static_argnames=(
        "selection_block_size",
        "num_selected",
        "num_initial_blocks",
        "num_local_blocks",
        "interpret",
        "tuning",
    ),
)
def top_blocks(
    importance: jax.Array,
    *,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    interpret: bool = False,
    tuning: TopNTuning | None = None,
) -> jax.Array:
    """Eq. 11 on ``importance`` float32 ``[B, T, H, Nb]`` (entries past a position's own block
    are never read): int32 ``[B, T, H, n]``, ascending, ``-1`` last, as
    :func:`nsa_jax.reference.selection.top_blocks` with every segment starting at 0."""
    _check_importance(importance)
    tuning = TopNTuning() if tuning is None else tuning
    length, num_blocks = importance.shape[1], importance.shape[3]
    parts = [
        top_blocks_of_range(
            importance,
            first=first,
            stop=stop,
            blocks=blocks,
            rows_first=0,
            selection_block_size=selection_block_size,
            num_selected=num_selected,
            num_initial_blocks=num_initial_blocks,
            num_local_blocks=num_local_blocks,
            interpret=interpret,
            tuning=tuning,
        )
        for first, stop, blocks in position_ranges(length, num_blocks, selection_block_size, tuning.narrowest)
    ]
    return jnp.concatenate(parts, axis=1)
