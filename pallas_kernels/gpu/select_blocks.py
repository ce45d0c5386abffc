"""Block selection (spec, "Selection scores (Eqs. 8-10)" and Eq. 11) as a Pallas kernel, Triton lowering.

With the default tuning, inputs that :mod:`pallas_kernels.gpu.block_importance_mosaic` serves
(16-bit, no segments, ``G = 16``; on a Hopper GPU or in interpret mode) go to its Mosaic GPU scores
and the top-n kernel of :mod:`pallas_kernels.gpu.top_n` instead: 6.4-6.6 against 9.0-9.1 ms at
T = 64K, Dk = 128 on the H200, 8.7-8.9 against 13.6 at Dk = 192 (experiments/results/
session28_h200.md). The kernel below serves the rest (float32, packed segments, other group
sizes) and explicit tunings.

Layouts follow :func:`nsa_jax.select_blocks`: ``q [B, T, HQ, Dk]``, compressed keys
``k_cmp [B, Tc, H, Dk]`` in the slot layout of :mod:`nsa_jax.segments`, ``lse``
float32 ``[B, T, HQ]`` from the compressed attention. Internally ``q`` is viewed as
``[B, T, H, G, Dk]``.

Tiled like the compressed-attention kernels (:mod:`pallas_kernels.gpu.compressed`): one
program per (query tile, KV head, batch); a query tile holds ``P`` positions times ``G'``
heads (``G' = next_pow2(G)``) as ``rows = P * G'`` rows, heavy (late) tiles first. The
program walks key tiles of ``Bk`` selection blocks, i.e. ``Bk * r'`` compressed tokens
(``r = l'/d`` tokens start in one block, ``r' = next_pow2(r)``, tokens ``r..r'-1`` of a
block are padding), counted from the segment start of the rows. Per key tile:

1. ``p = exp(q . k * scale - lse)`` ``[rows, Bk * r']`` (tensor-core dots, ``Dk`` cut into
   power-of-two pieces, 192 = 128 + 64; zero where a token is not visible, Eqs. 7-8, a mask
   that key tiles seen wholly by every row skip). On the GPU each ``p`` is one ``fma`` and one
   ``ex2.approx.ftz`` (:func:`pallas_kernels.gpu.tiles.exp2_affine`; ``p`` below 2^-126 is 0):
   Triton's ``exp2`` took five more instructions a logit in a kernel that is bound by issuing
   them, not by memory (ncu at T = 64K, Dk = 128: 5.4 G instructions before, 3.8 G after; 10.6
   against 9.5 ms; experiments/results/select_blocks_session16_h200.md).
2. Eq. 9 and the group sum (Eq. 10). Eq. 9 reaches at most one block back (``l <= l'``), so a
   block's importance is ``own + back'``: ``own`` its own tokens with their weights, ``back'``
   the tokens of the block before that feed it (the previous key tile's for the first block,
   zero before the segment start). ``quads`` (default): the key tile is loaded in an order
   that puts every selection block's tokens in one thread's columns of the wgmma accumulator
   (``SelectTuning.quads``); ``own`` and ``back`` are summed over tokens in-thread, then over
   the ``G`` heads (lane shuffles on a quarter of the values), and the one-block shift is
   in-thread but for one value a lane. Otherwise (the first kernel) ``p`` is summed over the
   heads first, then each token ``m`` is taken out and shifted separately.
   Blocks with equal inputs get equal importance (exact ties): every block goes through the
   same float32 operations, and picking and shifting add exact zeros only. ``back_dot`` (the
   16-bit default up to ``Dk = 256``) computes each block's ``back`` tokens again in a second dot instead,
   with no shift.
3. The ``Bk`` importances are written into a ``[P, Nb' / Bk, Bk]`` register tile holding
   every selection block of the ``P`` positions (``Nb' = next_pow2(ceil(T / l'))``).

Top-n (Eq. 11) then runs once per tile. ``top_n="flat"`` or ``"lanes"`` (default ``"flat"``):
the ``n_f`` forced blocks are placed directly and ``n - n_f`` rounds of arg-max (the maximum,
then the lowest block holding it, as ``lax.top_k``) pick the rest; with ``quads`` the blocks of
a position lie in one warp, so a round is in-thread work and lane shuffles. ``"argmax"`` (the
first kernel): forced blocks score ``+inf`` and ``n`` rounds of ``argmax`` over ``[P, Nb']``.
Blocks after a position's block are never picked; rounds past the visible blocks yield ``-1``.
The picks are put in the output order (ascending, ``-1`` last) by rank in the kernel.

Key tiles without segments: the compressed keys are first laid out in XLA as the kernel's key
tiles (:func:`_tiled_keys`: each tile's ``keys`` rows in the dot's column order, then the
``back_dot`` tiles, zero where a column holds no token, lanes zero-padded to the block), so a
program loads a tile as consecutive rows without masks. Gathering each tile's rows by token,
with a validity mask a row (still the path with segments, whose tiles start at each segment's
first token), took 13.56 against 13.47 ms at T = 64K, Dk = 192 and 9.39 against 9.05 at
Dk = 128 (medians of 4 interleaved rounds on the H200, the same picks;
experiments/results/session24_h200.md): the address and mask work was about a fifth of the
loop's instructions, most of it hidden behind the MMA waits. The copies take
``steps * (keys + back_columns) * Dk'`` values a KV head (10 MB at T = 64K, H = 4).

Packed rows (``segment_ids``): blocks and tokens count from each position's segment start,
so a tile whose positions belong to several segments runs one pass per segment, each over
that segment's tokens and writing only its positions (one pass in the unpacked case).

Cost: the query-key dot of the compressed attention (``2 * HQ * Dk`` flops and one ``exp``
per visible (query head, token) pair) plus ``O(P * Nb')`` register work per key tile. Memory:
registers for one key tile and the ``[P, Nb']`` importances (the queries stay in shared memory);
in HBM only the inputs, the key tiles and the picks ``[B, T, H, n']`` (int32): linear in ``T``. ``P`` shrinks
as ``Nb'`` grows so that the importances stay at ``P * Nb' <= 8192`` floats (``SelectTuning.state``),
down to the 16 rows ``tl.dot`` needs (``P = 1`` for ``G = 16``): beyond ``T = 512K`` (or earlier
for small ``G``) the importances take more registers. Every program streams the compressed keys
its positions see (from L2), so ``P`` also sets that traffic: a visible token's ``Dk`` values
once per ``P`` positions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from nsa_jax.reference.selection import overlap_weights
from nsa_jax.segments import segment_starts
from pallas_kernels.gpu import block_importance_mosaic
from pallas_kernels.gpu.tiles import (
    LOG2E,
    column_pieces,
    dot_nt,
    exp2_affine,
    padded,
    require_supported_dtype,
    visible_tokens,
)
from pallas_kernels.gpu.top_n import TopNShape, _ascending_unused_last, _top_n_argmax, _top_n_direct

# Log-sum-exp (base 2) given to dead rows (padded heads): exp2(logit - _NO_ROW) is 0.
_NO_ROW = 1e30


@dataclasses.dataclass(frozen=True)
class SelectTuning:
    """Tile sizes and variants of the kernel.

    ``rows``: query rows (positions times ``G'``) per tile when the importances allow it;
    ``keys``: compressed-token slots (``Bk * r'``) per key tile; powers of two >= 16. ``warps``
    and pipeline ``stages`` of the Triton program. ``unmasked``: key tiles that every row sees
    wholly run a second loop body without the visibility mask (fewer instructions a tile, more
    registers). ``quads``: load each key tile so that column ``8j + 2q + e`` of the dot (``q < 4``,
    ``e < 2``) holds tile slot ``q * keys/4 + 2j + e``: on Hopper's wgmma accumulator the
    columns of lane ``q`` (mod 4) are then whole selection blocks (``Bk >= 4``), which makes Eq. 9
    in-thread; ``False``: the first kernel's Eq. 9 (token by token after the group sum).
    ``top_n``: ``"flat"``, ``"lanes"`` or ``"argmax"`` (the first kernel), see the module notes.
    ``state``: upper bound on the register tile of importances, ``P * Nb'`` floats (8192: 32
    registers a thread at 8 warps); ``P`` shrinks below ``rows / G'`` to respect it.
    ``back_dot`` (with ``quads``): the Eq. 9 terms a block takes from tokens of the block before
    come from a second, ``Bk * b'``-column dot over those tokens' keys (``b`` of them a block, for
    every block of the tile), summed with the block's own tokens before the one group sum, instead
    of a second group sum shifted one block on; more dot and exp work (``b / r``), no shift and no
    carry between key tiles. The 16-bit default up to ``Dk = 256`` (:func:`default_tuning`).
    ``SelectTuning(quads=False, top_n="argmax")`` is the first kernel."""

    rows: int = 128
    keys: int = 64
    warps: int = 8
    stages: int = 2
    state: int = 8192
    unmasked: bool = True
    quads: bool = True
    top_n: str = "flat"
    back_dot: bool = False

    def __post_init__(self) -> None:
        if self.top_n not in ("flat", "lanes", "argmax"):
            raise ValueError(f"top_n must be 'flat', 'lanes' or 'argmax', got {self.top_n!r}")
        for name in ("rows", "keys", "warps", "stages", "state"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
            if name in ("rows", "keys") and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.back_dot and not self.quads:
            raise ValueError("back_dot needs quads=True (it sums in the quads layout)")


# 16-bit, Dk <= 256: 64-row tiles of 4 warps (P = 4 positions) with back_dot, session 8 on the H200
# at T = 64K, G = 16 (experiments/results/select_blocks_h200.md): 12.1-12.3 ms at Dk = 128 against
# 15.8-16.3 without back_dot, and 14.3 at Dk = 192 against 22.3 without it and 19.8 for the 32-row
# tiles of 2 warps (session 7's default there past 32K); 4.2 / 1.4 ms against 4.9 / 1.6 at Dk = 192,
# T = 32K / 16K. The first kernel (quads=False, top_n="argmax", 128 rows, 8 warps) took 26.0 / 23.8.
DEFAULT_TUNING = SelectTuning(rows=64, warps=4, back_dot=True)
# 16-bit, Dk <= 128, T > 32K: the same with key tiles of 128 compressed tokens. Session 14 on the
# H200, G = 16 (experiments/results/layer_session14_h200.md), two rounds, ms, against 64-key tiles,
# the same picks: T = 64K 10.4-10.8 against 12.1-12.1; 32K 3.2-3.3 against 3.0; 16K 1.2-1.3
# against 1.0. At Dk = 192 they lose at 64K (19.1 / 19.2 against 14.4 / 14.7). Lengths between 32K
# and 64K were not timed.
LONG_SMALL_DK_TUNING = dataclasses.replace(DEFAULT_TUNING, keys=128)
_LONG = 32768
# 16-bit, Dk > 256 (never timed): the same tiles without back_dot, whose second dot adds registers.
LARGE_DK_TUNING = dataclasses.replace(DEFAULT_TUNING, back_dot=False)
# float32 (its dots run on FMA units, for checks): smaller tiles than the 16-bit ones, which
# spill more; these still spill a little at some T (up to ~450 bytes of stack, as before quads).
FLOAT32_TUNING = SelectTuning(rows=64, keys=32)


def default_tuning(dtype: jnp.dtype, dk: int, length: int) -> SelectTuning:
    """float32: :data:`FLOAT32_TUNING`; 16-bit: :data:`LONG_SMALL_DK_TUNING` for ``dk <= 128``
    past ``T = 32K``, else :data:`DEFAULT_TUNING` up to ``dk = 256`` (the kernel drops its
    ``back_dot`` where the geometry has no back terms or too few of them for a dot, see
    :func:`select_blocks`), else :data:`LARGE_DK_TUNING`."""
    if jnp.dtype(dtype) == jnp.float32:
        return FLOAT32_TUNING
    if padded(dk) <= 128 and length > _LONG:
        return LONG_SMALL_DK_TUNING
    return DEFAULT_TUNING if padded(dk) <= 256 else LARGE_DK_TUNING


@dataclasses.dataclass(frozen=True)
class _Geometry(TopNShape):
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
    segmented: bool
    dtype: str
    tuning: SelectTuning
    # On the GPU: exp2 by one fma and ex2.approx.ftz (tiles.exp2_affine); False in interpret mode.
    flush_exp2: bool = False

    @property
    def heads_pow2(self) -> int:
        return pl.next_power_of_2(self.group)

    @property
    def ratio(self) -> int:
        """``r = l' / d``: compressed tokens starting in one selection block."""
        return self.selection_block_size // self.block_stride

    @property
    def ratio_pow2(self) -> int:
        return pl.next_power_of_2(self.ratio)

    @property
    def tile_blocks(self) -> int:
        """``Bk``: selection blocks per key tile; at least 2, so that Eq. 9 (which reaches at most
        one block back, ``l <= l'``) only needs the previous key tile, and 4 with ``quads``."""
        return max(4 if self.tuning.quads else 2, self.tuning.keys // self.ratio_pow2)

    @property
    def keys(self) -> int:
        return self.tile_blocks * self.ratio_pow2

    @property
    def num_blocks(self) -> int:
        return -(-self.length // self.selection_block_size)

    @property
    def blocks_padded(self) -> int:
        return max(pl.next_power_of_2(self.num_blocks), self.tile_blocks)

    @property
    def steps(self) -> int:
        return self.blocks_padded // self.tile_blocks

    @property
    def positions(self) -> int:
        """``P``: query positions per tile, a power of two with ``P * G' >= 16`` (``tl.dot``)."""
        fits = max(1, self.tuning.state // self.blocks_padded)
        wanted = min(max(1, self.tuning.rows // self.heads_pow2), 1 << (fits.bit_length() - 1))
        return max(wanted, 16 // min(self.heads_pow2, 16))

    @property
    def rows(self) -> int:
        return self.positions * self.heads_pow2

    @property
    def query_tiles(self) -> int:
        return -(-self.length // self.positions)

    @property
    def dk_pieces(self) -> tuple[tuple[int, int], ...]:
        """``(offset, width)`` column pieces of ``Dk`` (:func:`column_pieces`: 192 = 128 + 64)."""
        return column_pieces(self.dk)

    @property
    def terms(self) -> tuple[tuple[int, int, int], ...]:
        """Eq. 9 as ``(weight, m, back)``: token ``m`` of the block ``back`` blocks earlier."""
        first, weights = overlap_weights(self.block_length, self.block_stride, self.selection_block_size)
        out = []
        for k, weight in enumerate(weights):
            back, m = divmod(first + k, self.ratio)
            out.append((weight, m, -back))
        return tuple(out)

    @property
    def carried(self) -> tuple[int, ...]:
        """Token offsets ``m`` whose per-block sums the next key tile needs (without ``quads``)."""
        return tuple(sorted({m for _, m, back in self.terms if back > 0}))

    def _weights(self, back: int) -> tuple[int, ...]:
        weights = [0] * self.ratio_pow2
        for weight, m, term_back in self.terms:
            if term_back == back:
                weights[m] = weight
        return tuple(weights)

    @property
    def own_weights(self) -> tuple[int, ...]:
        """Eq. 9 weight of token ``m`` of a block in its own importance (0: none or padding)."""
        return self._weights(0)

    @property
    def back_tokens(self) -> tuple[tuple[int, int], ...]:
        """``(weight, m)`` of the Eq. 9 terms from token ``m`` of the block before."""
        return tuple((weight, m) for weight, m, back in self.terms if back == 1)

    @property
    def back_columns(self) -> int:
        """Columns of the ``back_dot`` tile: ``Bk`` blocks of ``b'`` back tokens."""
        return self.tile_blocks * pl.next_power_of_2(max(1, len(self.back_tokens)))

    @property
    def back_dot_fits(self) -> bool:
        """Whether ``back_dot`` has work here: back terms (``l > d``) and a dot of >= 16 columns."""
        return bool(self.back_tokens) and self.back_columns >= 16

    @property
    def back_weights(self) -> tuple[int, ...]:
        """Eq. 9 weight of token ``m`` of a block in the next block's importance (``l <= l'``:
        no term reaches further back)."""
        return self._weights(1)

    @property
    def precision(self) -> jax.lax.Precision | None:
        """Full float32 dots for float32 inputs (the Triton default would be TF32)."""
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None


def _shifted(current: jax.Array, previous: jax.Array, back: int) -> jax.Array:
    """``[P, Bk]``: the value of the block ``back`` blocks earlier, from ``previous`` (the last key
    tile) for the first ``back`` blocks. Sums one value and zeros: exact."""
    if back == 0:
        return current
    blocks = current.shape[1]
    target = jnp.arange(blocks)[:, None] - back
    source = jnp.arange(blocks)[None, :]
    picked = jnp.where(
        (source == target)[None],
        current[:, None, :],
        jnp.where((source == target + blocks)[None], previous[:, None, :], 0.0),
    )
    return jnp.sum(picked, axis=2)


def _split_last(x: jax.Array) -> list[jax.Array]:
    """The entries along the last axis of ``x`` (a power of two), each without that axis."""
    return [part.reshape(part.shape[:-1]) for part in jnp.split(x, x.shape[-1], axis=-1)]


def _weighted_sum(parts: list[jax.Array], weights: tuple[int, ...]) -> jax.Array:
    """``w_0 x_0 + w_1 x_1 + ...`` left to right over the nonzero weights, each run of equal
    consecutive weights summed before its one product (weight 1: none). For the paper's weights
    (2, 2, 2, 1) that is bitwise the term-by-term sum: doubling is exact and the run comes first."""
    runs: list[tuple[int, jax.Array]] = []
    for part, weight in zip(parts, weights, strict=True):
        if not weight:
            continue
        if runs and runs[-1][0] == weight:
            runs[-1] = (weight, runs[-1][1] + part)
        else:
            runs.append((weight, part))
    total = None
    for weight, run in runs:
        term = run if weight == 1 else float(weight) * run
        total = term if total is None else total + term
    return jnp.zeros_like(parts[0]) if total is None else total


def _shifted_quads(current: jax.Array, previous: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``current [P, Bk]`` one block later, ``previous [P]`` (the last block of the last key tile)
    first; and the last block of ``current``. Blocks are viewed as ``[P, 4, Bk / 4]``: on the wgmma
    accumulator (see ``SelectTuning.quads``) the quarters lie on 4 lanes and the blocks of a quarter
    in registers, so the shift is in-thread but for the quarters' last blocks, which cross lanes
    (one lane reduction each). Copies and sums of one value and zeros: exact."""
    P, blocks = current.shape
    inner = blocks // 4
    pieces = _split_last(current.reshape(P, 4, inner))
    quarter = jnp.arange(4)[None, :]
    lasts = [previous] + [jnp.sum(jnp.where(quarter == t, pieces[-1], 0.0), axis=1) for t in range(4)]
    first = lasts[3][:, None]
    for t in (2, 1, 0):
        first = jnp.where(quarter == t, lasts[t][:, None], first)
    member = jnp.arange(inner)[None, None, :]
    shifted = first[:, :, None]
    for i in range(1, inner):
        shifted = jnp.where(member == i, pieces[i - 1][:, :, None], shifted)
    return shifted.reshape(P, blocks), lasts[4]


def _probabilities(logits: jax.Array, log2_scale: float, row_offset: jax.Array, flush: bool) -> jax.Array:
    """``p = exp2(logits * scale * log2(e) - lse2)`` (Eq. 8 in base 2), float32 ``[rows, keys]``;
    ``flush``: :func:`pallas_kernels.gpu.tiles.exp2_affine`'s GPU form (p below 2^-126 is 0)."""
    return exp2_affine(logits, log2_scale, row_offset, flush=flush)


def _importance_by_token(p: jax.Array | None, previous: tuple[jax.Array, ...], geo: _Geometry):
    """The first kernel's Eq. 9 on a key tile, ``p [rows, keys]`` (``None``: no tokens): the group sum
    ``g [P, keys]``, token ``m`` of each block ``g_m [P, Bk]`` picked out, then
    ``0 + w_0 x_0 + w_1 x_1 + ...`` over the terms (the reference's order), the terms of the block
    before taken from ``previous`` (its ``g_m`` of the last key tile) for the first block.
    Returns ``(importance [P, Bk], the g_m the next tile needs)``."""
    P, blocks = geo.positions, geo.tile_blocks
    if p is None:
        tokens = [jnp.zeros((P, blocks), jnp.float32)] * geo.ratio
    else:
        grouped = jnp.sum(p.reshape(P, geo.heads_pow2, geo.keys), axis=1)
        by_token = grouped.reshape(P, blocks, geo.ratio_pow2)
        token_lane = jnp.arange(geo.ratio_pow2)[None, None, :]
        tokens = [jnp.sum(jnp.where(token_lane == m, by_token, 0.0), axis=2) for m in range(geo.ratio)]
    importance = jnp.zeros((P, blocks), jnp.float32)
    for weight, m, back in geo.terms:
        carried = previous[geo.carried.index(m)] if back else None
        importance = importance + float(weight) * _shifted(tokens[m], carried, back)
    return importance, tuple(tokens[m] for m in geo.carried)


def _quads_order(columns: int) -> jax.Array:
    """Tile slot of each dot column in the quads order (``SelectTuning.quads``): column
    ``8j + 2q + e`` holds slot ``q * columns/4 + 2j + e``."""
    column = jnp.arange(columns)
    return (column // 2) % 4 * (columns // 4) + column // 8 * 2 + column % 2


def _by_block(p: jax.Array, blocks: int) -> list[jax.Array]:
    """``p [rows, columns]`` loaded in the quads order, as the ``columns / blocks`` token planes
    ``[rows, blocks]`` (a reshape and transpose that move no data on the wgmma accumulator)."""
    rows, columns = p.shape
    p = p.reshape(rows, columns // 8, 4, 2).transpose(0, 2, 1, 3)
    return _split_last(p.reshape(rows, blocks, columns // blocks))


def _group_sum(x: jax.Array, geo: _Geometry) -> jax.Array:
    """``x [rows, Bk]`` summed over the ``G'`` heads of each position (Eq. 10): ``[P, Bk]``."""
    return jnp.sum(x.reshape(geo.positions, geo.heads_pow2, geo.tile_blocks), axis=1)


def _importance_by_quarter(p: jax.Array | None, previous: jax.Array, geo: _Geometry):
    """Eq. 9 on a key tile loaded in ``quads`` order, ``p [rows, keys]`` (``None``: no tokens):
    back in tile-slot order (a reshape and transpose that move no data on the wgmma accumulator),
    each block's tokens summed with their weights (``own``, and ``back`` for the next block), then
    the group sums; ``own`` plus ``back`` one block later (``previous [P]``: the last block's
    ``back`` of the last key tile). Returns ``(importance [P, Bk], this tile's last back [P])``."""
    P, blocks = geo.positions, geo.tile_blocks
    if p is None:
        own = back = jnp.zeros((P, blocks), jnp.float32)
    else:
        tokens = _by_block(p, blocks)
        own = _group_sum(_weighted_sum(tokens, geo.own_weights), geo)
        back = _group_sum(_weighted_sum(tokens, geo.back_weights), geo) if any(geo.back_weights) else None
    if not any(geo.back_weights):
        return own, previous
    shifted, last = _shifted_quads(back, previous)
    return own + shifted, last


def _importance_with_back_dot(p: jax.Array, p_back: jax.Array, geo: _Geometry) -> jax.Array:
    """Eq. 9 with ``back_dot``: each block's own tokens (``p [rows, keys]``) and the tokens of the
    block before that feed it (``p_back [rows, back_columns]``, the ``back_tokens`` in order, for
    the same blocks) weighted and summed per row, then one group sum: ``[P, Bk]``."""
    own = _weighted_sum(_by_block(p, geo.tile_blocks), geo.own_weights)
    back_planes = _by_block(p_back, geo.tile_blocks)
    back_weights = [weight for weight, _ in geo.back_tokens]
    back_weights += [0] * (len(back_planes) - len(back_weights))
    return _group_sum(own + _weighted_sum(back_planes, tuple(back_weights)), geo)


def _key_columns(geo: _Geometry) -> tuple[jax.Array, jax.Array]:
    """``(token, used) [keys]``: the token (counted from the key tile's first) that each column of
    the key tile's dot holds, in order or in the quads order, and whether it is one (``r < r'``
    pads each block to ``r'`` columns)."""
    key_row = _quads_order(geo.keys) if geo.tuning.quads else jnp.arange(geo.keys)
    key_block, key_token = key_row // geo.ratio_pow2, key_row % geo.ratio_pow2
    return key_block * geo.ratio + key_token, key_token < geo.ratio


def _back_columns(geo: _Geometry) -> tuple[jax.Array, jax.Array]:
    """``(token, used) [back_columns]``: the token of each ``back_dot`` column, counted from the
    key tile's first (the block before's, so negative for the tile's first block), and whether
    the column holds a back term."""
    back_row = _quads_order(geo.back_columns)
    per_block = geo.back_columns // geo.tile_blocks
    back_block, back_term = back_row // per_block, back_row % per_block
    back_m = jnp.zeros_like(back_term)
    for term, (_, m) in enumerate(geo.back_tokens):
        back_m = jnp.where(back_term == term, m, back_m)
    return (back_block - 1) * geo.ratio + back_m, back_term < len(geo.back_tokens)


def _tiled_keys(k_cmp: jax.Array, geo: _Geometry, columns) -> jax.Array:
    """``k_cmp [B, Tc, H, Dk]`` laid out as the kernel's key tiles (unsegmented rows):
    ``[B, steps * width, H, Dk]``, row ``t * width + c`` holding the key of column ``c`` of key
    tile ``t`` (``columns(geo)``: :func:`_key_columns` or :func:`_back_columns`), zero where the
    column holds no token of ``0 .. Tc - 1``. The kernel then loads a tile as ``width``
    consecutive rows without masks."""
    offsets, used = columns(geo)
    token = jnp.arange(geo.steps)[:, None] * (geo.tile_blocks * geo.ratio) + offsets[None, :]
    ok = (used[None, :] & (token >= 0) & (token < geo.slots)).reshape(-1)
    rows = jnp.take(k_cmp, jnp.clip(token, 0, geo.slots - 1).reshape(-1), axis=1)
    return jnp.where(ok[None, :, None, None], rows, jnp.zeros((), k_cmp.dtype))


def _kernel(starts_ref, q_ref, lse_ref, k_ref, *refs, geo: _Geometry):
    """One query tile of one KV head: ``q_ref [T, G', Dk]``, ``lse_ref [T, G']``, ``starts_ref
    [T]`` (segment starts), ``out_ref [T, n']`` (picks, the last of ``refs``); ``k_ref``:
    ``[Tc, Dk]`` with segments, else the key tiles of :func:`_tiled_keys` ``[steps * keys, Dk]``
    and, with ``back_dot``, the back-dot tiles ``[steps * back_columns, Dk]`` (first of ``refs``)."""
    *back_refs, out_ref = refs
    P, gq, blocks = geo.positions, geo.heads_pow2, geo.tile_blocks
    first_position = (geo.query_tiles - 1 - pl.program_id(0)) * P

    row = jnp.arange(geo.rows)
    row_position = first_position + row // gq
    head = row % gq
    live = (row_position < geo.length) & (head < geo.group)
    row_position = jnp.where(live, row_position, 0)
    head = jnp.where(live, head, 0)
    q = []
    for offset, width in geo.dk_pieces:
        lane = offset + jnp.arange(width)
        q.append(
            plt.load(
                q_ref.at[row_position[:, None], head[:, None], lane[None, :]],
                mask=live[:, None] & (lane < geo.dk)[None, :],
                other=0,
            )
        )
    lse = plt.load(lse_ref.at[row_position, head], mask=live, other=0)
    # As the reference: a non-finite lse (-inf: nothing visible, every p masked) reads as 0.
    lse2 = jnp.where(jnp.abs(lse) < jnp.inf, lse * LOG2E, 0.0)
    row_start = plt.load(starts_ref.at[row_position], mask=live, other=0)
    row_count = visible_tokens(row_position - row_start, geo.block_length, geo.block_stride, live)

    position = first_position + jnp.arange(P)
    position_live = position < geo.length
    position = jnp.where(position_live, position, 0)
    position_start = plt.load(starts_ref.at[position], mask=position_live, other=0)
    current = jax.lax.div(position - position_start, geo.selection_block_size)

    step = jnp.arange(geo.steps)[None, :, None]
    token_in_tile, key_used = _key_columns(geo)
    if geo.tuning.back_dot:
        back_in_tile, back_used = _back_columns(geo)
    log2_scale = geo.scale * LOG2E
    importance_of = _importance_by_quarter if geo.tuning.quads else _importance_by_token

    def run_pass(start, opens, state):
        """Importances of the positions whose segment starts at ``start`` into ``state``
        (nothing unless ``opens``)."""
        in_rows = live & (row_start == start) & opens
        in_positions = position_live & (position_start == start) & opens
        base = jax.lax.div(start + geo.block_stride - 1, geo.block_stride)
        count = jnp.clip(jnp.where(in_rows, row_count, 0), 0, jnp.maximum(geo.slots - base, 0))
        tile_tokens = blocks * geo.ratio
        key_tiles = jax.lax.div(jnp.max(count) + tile_tokens - 1, tile_tokens)
        # Key tiles every row of the pass sees wholly may skip the visibility mask; dead rows
        # (padded heads) get p = exp2(-huge) = 0 from their offset instead. Rows of other segments
        # only feed the group sums of their own positions, which this pass does not write.
        full_tiles = jnp.minimum(
            jax.lax.div(jnp.min(jnp.where(in_rows, count, key_tiles * tile_tokens)), tile_tokens), key_tiles
        )
        row_offset = jnp.where(in_rows, lse2, _NO_ROW)
        position_count = visible_tokens(position - start, geo.block_length, geo.block_stride, in_positions)
        position_count = jnp.clip(position_count, 0, jnp.maximum(geo.slots - base, 0))
        block_tiles = jax.lax.div(jnp.max(jnp.where(in_positions, current + blocks, 0)), blocks)

        def load_key(tiles_ref, tile, token, valid, offset, width):
            """Keys ``[columns, width]`` (lanes ``offset ..``) of the tokens ``token``: with
            segments gathered from ``k_ref`` (zero where not ``valid``), else key tile ``tile``
            of ``tiles_ref`` (:func:`_tiled_keys`), consecutive rows loaded without masks."""
            if not geo.segmented:
                columns = token.shape[0]
                return plt.load(tiles_ref.at[pl.ds(tile * columns, columns), pl.ds(offset, width)])
            slot = jnp.where(valid, base + token, 0)
            lane = offset + jnp.arange(width)
            return plt.load(
                k_ref.at[slot[:, None], lane[None, :]],
                mask=valid[:, None] & (lane < geo.dk)[None, :],
                other=0,
            )

        def probabilities(tiles_ref, tile, token: jax.Array, valid: jax.Array, masked: bool) -> jax.Array:
            """``p [rows, columns]`` of the pass's tokens ``token [columns]`` (key tile ``tile``
            of ``tiles_ref`` without segments); zero where not ``valid`` if ``masked``, and where
            a row's position does not see the token."""
            logits = None
            for piece, (offset, width) in zip(q, geo.dk_pieces, strict=True):
                k = load_key(tiles_ref, tile, token, valid, offset, width)
                s = dot_nt(piece, k, geo.precision)
                logits = s if logits is None else logits + s
            p = _probabilities(logits, log2_scale, row_offset, geo.flush_exp2)
            if masked:
                # Visibility per position (its rows share it; dead rows have p = 0).
                columns = token.shape[0]
                seen = (token[None, :] < position_count[:, None]) & valid[None, :]
                seen = jnp.broadcast_to(seen[:, None, :], (P, gq, columns)).reshape(geo.rows, columns)
                p = jnp.where(seen, p, 0.0)
            return p

        def tile_step(with_keys: bool, masked: bool = False):
            def body(tile, carry):
                state, previous = carry
                p = None
                first_token = tile * (blocks * geo.ratio)
                if with_keys:
                    token = first_token + token_in_tile
                    valid = key_used & (token < geo.slots - base)
                    p = probabilities(k_ref, tile, token, valid, masked)
                if geo.tuning.back_dot:
                    token = first_token + back_in_tile
                    valid = back_used & (token >= 0) & (token < geo.slots - base)
                    # Always masked: block 0's back tokens precede the pass's first token.
                    back_p = probabilities(back_refs[0] if back_refs else None, tile, token, valid, True)
                    importance = _importance_with_back_dot(p, back_p, geo)
                else:
                    importance, previous = importance_of(p, previous, geo)
                write = in_positions[:, None, None] & (step == tile)
                return jnp.where(write, importance[:, None, :], state), previous

            return body

        if geo.tuning.quads:
            previous = jnp.zeros((P,), jnp.float32)
        else:
            previous = tuple(jnp.zeros((P, blocks), jnp.float32) for _ in geo.carried)
        carry = (state, previous)
        if geo.tuning.unmasked:
            carry = jax.lax.fori_loop(0, full_tiles, tile_step(True), carry)
        else:
            full_tiles = 0
        state, previous = jax.lax.fori_loop(full_tiles, key_tiles, tile_step(True, masked=True), carry)
        # A block just past the last visible token can still take a carried term (with back_dot
        # from its back tokens; the tile's own tokens are all past the visible ones, masked).
        state, _ = jax.lax.fori_loop(
            key_tiles,
            jnp.minimum(key_tiles + 1, block_tiles),
            tile_step(geo.tuning.back_dot, masked=True),
            (state, previous),
        )
        return state

    state = jnp.zeros((P, geo.steps, blocks), jnp.float32)
    if geo.segmented:

        def segment_pass(i, state):
            # Position i opens a pass when it is the first of its segment in this tile.
            here = jnp.minimum(first_position + i, geo.length - 1)
            start = starts_ref[here]
            before = starts_ref[jnp.maximum(here - 1, 0)]
            opens = (first_position + i < geo.length) & ((i == 0) | (start != before))
            return run_pass(start, opens, state)

        state = jax.lax.fori_loop(0, P, segment_pass, state)
    else:
        state = run_pass(jnp.int32(0), jnp.bool_(True), state)

    scores = state.reshape(P, geo.blocks_padded)
    if geo.tuning.top_n == "argmax" or geo.num_selected < geo.forced_blocks:
        picks = _top_n_argmax(scores, current, geo)
    else:
        picks = _top_n_direct(scores, current, geo, geo.tuning.top_n)
    picks = _ascending_unused_last(picks, geo.blocks_padded)
    # Dead positions and lanes past n' store out of range (masked): in interpret mode a masked
    # store to a clamped duplicate would overwrite a live one.
    target = jnp.where(position_live, position, geo.length)
    pick_lane = jnp.arange(picks.shape[1])[None, :]
    plt.store(
        out_ref.at[target[:, None], pick_lane],
        picks,
        mask=position_live[:, None] & (pick_lane < geo.picks_padded),
    )


def _per_head(length: int, *trailing: int) -> pl.BlockSpec:
    """Block of a whole row ``[length, ...]`` of one KV head, for grid ``(tiles, H, B)``."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((None, length, None, *trailing), lambda x, h, b: (b, 0, h, *zeros))


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
        "tuning",
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
    tuning: SelectTuning | None = None,
) -> jax.Array:
    """Top-n selection blocks with a Pallas kernel; see :func:`nsa_jax.select_blocks`.

    Args:
      q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]`` (slot layout, ``1 <= Tc <= ceil(T/d)``),
        same float dtype; lse: float32 ``[B, T, HQ]`` from the compressed attention.
      block_length, block_stride, selection_block_size: ``l``, ``d``, ``l'``.
      num_selected, num_initial_blocks, num_local_blocks: ``n`` and the forced blocks.
      scale: logit scale; segment_ids: int ``[B, T]`` or ``None``.
      interpret: run the kernel in Pallas interpret mode (CPU).
      tuning: tile sizes, warps and stages of this kernel; ``None``: the scores and top-n of
        :mod:`pallas_kernels.gpu.block_importance_mosaic` where it serves the inputs (16-bit, no
        segments, ``G = 16``, on a Hopper GPU or in interpret mode), else this kernel with
        :func:`default_tuning` of the dtype and ``Dk``.

    Returns:
      int32 ``[B, T, H, n]``: blocks counted from the segment start, ascending, ``-1``
      (unused slots) last. Carries no gradient.
    """
    batch, length, q_heads, dk = q.shape
    kv_heads = k_cmp.shape[2]
    served = block_importance_mosaic.supports(
        segmented=segment_ids is not None,
        group=q_heads // kv_heads,
        dk=dk,
        dtype=jnp.dtype(q.dtype).name,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        interpret=interpret,
    )
    if tuning is None and served:
        return block_importance_mosaic.select_blocks(
            q,
            k_cmp,
            lse,
            block_length=block_length,
            block_stride=block_stride,
            selection_block_size=selection_block_size,
            num_selected=num_selected,
            num_initial_blocks=num_initial_blocks,
            num_local_blocks=num_local_blocks,
            scale=scale,
            interpret=interpret,
        )
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
        segmented=segment_ids is not None,
        dtype=jnp.dtype(q.dtype).name,
        tuning=default_tuning(q.dtype, dk, length) if tuning is None else tuning,
        flush_exp2=not interpret,
    )
    if tuning is None and geo.tuning.back_dot and not geo.back_dot_fits:
        geo = dataclasses.replace(geo, tuning=dataclasses.replace(geo.tuning, back_dot=False))
    if geo.tuning.back_dot and geo.back_columns < 16:
        raise ValueError(
            "tuning.back_dot needs >= 16 back-dot columns (key-tile blocks times the next power of "
            f"two >= the back tokens of a block), got {geo.back_columns}: use more keys"
        )
    q5 = jax.lax.stop_gradient(q).reshape(batch, length, kv_heads, geo.group, dk)
    lse4 = jax.lax.stop_gradient(lse).astype(jnp.float32).reshape(batch, length, kv_heads, geo.group)
    k_cmp = jax.lax.stop_gradient(k_cmp)
    starts = segment_starts(segment_ids, batch, length)
    if geo.segmented:
        keys = [k_cmp]
    else:
        # Zero lanes up to the block's width, so that the kernel's tile loads need no masks.
        lanes = ((0, 0), (0, 0), (0, 0), (0, padded(dk) - dk))
        keys = [jnp.pad(_tiled_keys(k_cmp, geo, _key_columns), lanes)]
        if geo.tuning.back_dot:
            keys.append(jnp.pad(_tiled_keys(k_cmp, geo, _back_columns), lanes))
    picks = pl.pallas_call(
        functools.partial(_kernel, geo=geo),
        grid=(geo.query_tiles, kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, length), lambda x, h, b: (b, 0)),
            _per_head(length, geo.heads_pow2, padded(dk)),
            _per_head(length, geo.heads_pow2),
            *(_per_head(x.shape[1], padded(dk)) for x in keys),
        ],
        out_specs=_per_head(length, geo.picks_padded),
        out_shape=jax.ShapeDtypeStruct((batch, length, kv_heads, geo.picks_padded), jnp.int32),
        compiler_params=plt.CompilerParams(num_warps=geo.tuning.warps, num_stages=geo.tuning.stages),
        interpret=interpret,
        name="nsa_select_blocks",
    )(starts, q5, lse4, *keys)
    return picks[..., :num_selected]


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
