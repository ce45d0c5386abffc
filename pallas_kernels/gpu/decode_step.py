"""Compressed attention and block selection of one decode step, and the whole step, as Pallas kernels
(Triton lowering).

Spec, "Decoding", "Compression branch (Eqs. 7-8)", "Selection scores (Eqs. 8-10)" and
Eq. 11, for one query per sequence at position ``t = lengths - 1`` (no segments: the
decode cache holds one sequence per row).

Kernel 1 (``nsa_decode_compressed``), grid ``(P, H, B)``: the ``Tc`` compressed tokens
of a (sequence, KV head) are split into ``P`` chunks (flash-decoding style) so that
``P * H * B`` programs fill the GPU even at batch 1. A program loads the ``G`` query
heads of its group as one ``[G', Dk]`` tile (``Dk`` in power-of-two column pieces,
192 = 128 + 64, whose dots are summed), streams its chunk ``tile`` tokens at a time and
writes an unnormalised partial ``(max, sum, acc)`` of the compressed attention. It also
applies Eq. 9 to each tile's probabilities, relative to the running maximum ``m`` after
the tile (``exp2(s - m)``, the factors the online softmax computes anyway): a tile of
``tile`` tokens holds ``tile / (l'/d)`` whole selection blocks, and per head it writes
each block's Eq. 9 sum, over its own tokens and the last tokens of the block before that
Eq. 9 also gives it (none when ``l = d``), with ``m`` per tile: one float per block and
head (1/4 of the logits at ``l'/d = 4``), instead of every logit. For a tile's first block
those last tokens lie in the tile before, whose logits the loop carries; for a chunk's
first block, in the chunk before: the loop then starts at tile ``-1``, which reads only
the keys of that last block (and adds nothing to the softmax). Where Eq. 9 gives the
block after the last visible token a share, its tile is written too (its own tokens add
nothing). It also zeroes the per-(sequence, KV head) ticket counters of kernel 2 and of
the whole step's second kernel.

Kernel 2 (``nsa_decode_select``), grid ``(Q, H, B)``: the ``Nb`` selection blocks of a
(sequence, KV head) are split into ``Q`` parts of ``K <= 256`` blocks. Every program
merges the ``P`` (max, sum) partials into the per-head log-sum-exp; the first
``min(Q, Dv' / W)`` programs each write an equal column slice of the merged compressed
output, ``W`` columns (one ``[P, G', W]`` load) at a time. Every program scores its
``K`` blocks, block ``j``'s importance being (Eqs. 9-10)
``sum_h exp2(m_h(tile(j)) - lse_h) * sums_h[j]``
(the sums and maxima are loaded first: their addresses need neither the query's position
nor the log-sum-exp), and writes its best ``c = min(n', K)`` blocks as candidates with
their ranking scores (forced blocks of Eq. 11 first, then by importance, lowest block on
ties, as ``lax.top_k``; ``c`` argmax reductions over its ``K`` blocks). It then takes a
ticket from the counter (an acquire-release atomic after a block barrier, so the row's
other candidates are visible to the last one); the program that draws
the last ticket ranks the row's ``Q * c`` candidates by pairwise comparison (the same
order; ``Q`` is capped so that ``Q * c <= max(128, n')`` up to ``Nb = 256 * 128 / c``
blocks, 128K tokens at the paper's ``n = 16``, ``l' = 64``), keeps the first ``n`` and
writes them sorted ascending with the unused slots (``-1``) last. The row's top ``n`` are
among its parts' top ``n``, so the ``n`` sequential reductions run over a part, in
parallel, not over the row.

Every block's score has the same form (each token's share ``w * exp2(s - m)`` with ``m``
its block's tile maximum, summed over the token's offset in its block, own and back sums
added), so blocks with equal logits tie exactly where their tiles' running maxima are equal
(as in constant or periodic inputs); where those differ, the float32 products may differ in
the last bit, below the reference's own rounding.

Two launches and no host sync (:func:`compressed_and_selection`); with
:mod:`pallas_kernels.gpu.decode` for the selected and window reads, three kernels make a
decode step. Besides the inputs, HBM traffic is the Eq. 9 sums (written and read once), the
``[B, H, P, G', Dv']`` partials and the ``[B, H, Q * c]`` candidates and their scores.

The whole step (:func:`whole_step`) takes two launches: kernel 1, then
``nsa_decode_select_read`` over the programs of :mod:`pallas_kernels.gpu.decode`'s reads
(grid ``(R, H, B)``, a row's selected blocks and window blocks dealt to its programs).
A window program needs no picks: it writes its column slice of the merged compressed output
and streams its window blocks at once. Every selected-block program picks the row's blocks
itself (:func:`_row_picks`, the first one also writes them): it scores all ``Nb`` blocks
from kernel 1's sums as kernel 2 scores a part (``heads_per_load`` heads at a time, so the
loaded sums stay within registers) and takes the top ``n`` with ``n'`` argmax rounds over the
row, in kernel 2's order, then streams its blocks. The selection thus runs while the
window streams, with no launch between it and the reads; the programs of a row repeat it
(two at B=16, S=64K, from L2), which costs less than the launch it replaces (session 21:
85.5 against 91.7 us a step at B=16, S=64K, Dk=192,
``experiments/results/session21_h200.md``). In Pallas interpret mode the programs run
one after another, so the last ticket goes to the last program and the barrier (a GPU-only
primitive) is left out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from nsa_jax.reference.selection import overlap_weights
from pallas_kernels.gpu import decode
from pallas_kernels.gpu.tiles import (
    LOG2E,
    MASKED,
    dot,
    dot_nt_pieces,
    lanes,
    load,
    load_pieces,
    padded,
    per_sequence_block,
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
# Kernel 2's launch: warps and the programs to aim for (one wave, as kernel 1). Four warps (199 registers,
# two programs an SM): kernel 2 took 11.2-11.4 us at B=16, S=64K (both head dims) against 12.4-12.5 with
# eight (122 registers), and 11.6-11.7 against 12.0-12.2 at B=1 (experiments/results/decode_h200.md,
# session 9). Before the candidates carried their scores, eight warps were the faster (12.7 against 13.0).
_SELECT_LAUNCH = (4, 264)
# Most selection blocks a kernel-2 program scores (in one step) and picks candidates from.
_PART_BLOCKS = 256
# Candidates the last program of a row ranks, at most (or n', if larger): it compares every pair.
_CANDIDATES = 128
# Columns of the [rows, columns] comparison tile per ranking step.
_RANK_COLUMNS = 32
# Floats of kernel 1's partials that kernel 2 loads at once when merging (64 a thread at the default 4 warps).
_MERGE_ELEMENTS = 8192
# Floats of Eq. 9 sums a selecting program of the whole step loads at once (32 a thread at 4 warps).
_ROW_ELEMENTS = 4096
# Score of a block that cannot be picked: below every importance (those are >= 0).
_UNAVAILABLE = -1.0
# Score of a block already picked: below every other.
_TAKEN = -2.0


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
    def chunk(self) -> int:
        return self.tiles_per_chunk * self.tile

    @property
    def ratio(self) -> int:
        """Compressed tokens per selection block, ``l' / d``."""
        return self.selection_block_size // self.block_stride

    @property
    def blocks_per_tile(self) -> int:
        return self.tile // self.ratio

    @property
    def num_tiles(self) -> int:
        return self.chunks * self.tiles_per_chunk

    @property
    def block_columns(self) -> int:
        """Selection blocks of kernel 1's Eq. 9 sums rows: every block of every tile."""
        return self.num_tiles * self.blocks_per_tile

    @property
    def eq9_weights(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Eq. 9 weights by a token's offset in its selection block (``l'/d`` each): in the
        block itself (``own``) and in the next block (``back``, zero where it has none)."""
        first, weights = overlap_weights(self.block_length, self.block_stride, self.selection_block_size)
        own = tuple(weights[offset - first] for offset in range(self.ratio))
        back = tuple(
            weights[offset - self.ratio - first] if offset >= self.ratio + first else 0
            for offset in range(self.ratio)
        )
        return own, back

    @property
    def has_back(self) -> bool:
        """Whether Eq. 9 gives a block tokens of the block before (``l > d``)."""
        return any(self.eq9_weights[1])

    @property
    def num_blocks(self) -> int:
        """Selection blocks that can hold a query: ``ceil(Tc * d / l')`` (``lengths <= Tc * d``)."""
        return -(-self.slots * self.block_stride // self.selection_block_size)

    @property
    def row_blocks(self) -> int:
        """Selection blocks a row's picks are chosen from: ``Nb`` padded to a power of two."""
        return padded(self.num_blocks)

    @property
    def heads_per_load(self) -> int:
        """Query heads whose Eq. 9 sums over all ``row_blocks`` the selecting programs of
        :func:`whole_step` load at once: at most ``_ROW_ELEMENTS`` floats."""
        return min(self.rows, _largest_power_of_two(_ROW_ELEMENTS // self.row_blocks))

    @property
    def blocks_per_part(self) -> int:
        return padded(self.num_blocks) // self.parts

    @property
    def candidates_per_part(self) -> int:
        return min(self.picks_padded, self.blocks_per_part)

    @property
    def candidates(self) -> int:
        return self.parts * self.candidates_per_part

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


def _offset_weights(weights: tuple[int, ...]) -> jax.Array:
    """float32 ``[l'/d]`` of static ``weights`` (a kernel may not capture array constants)."""
    offset = jnp.arange(len(weights))
    out = jnp.zeros((len(weights),), jnp.float32)
    for index, weight in enumerate(weights):
        out = jnp.where(offset == index, float(weight), out)
    return out


def _compressed_kernel(
    length_ref,
    q_ref,
    k_ref,
    v_ref,
    max_ref,
    sum_ref,
    acc_ref,
    tile_max_ref,
    count_ref,
    reads_count_ref,
    block_sums_ref,
    *,
    geo,
):
    """One (chunk, KV head, sequence): ``q_ref [G', Dk']``, ``k_ref [Tc, Dk']``,
    ``v_ref [Tc, Dv']``; writes ``max_ref``/``sum_ref [G']`` (log2 units),
    ``acc_ref [G', Dv']``, ``tile_max_ref [tiles, G']``, zeros to ``count_ref [1]`` (kernel 2's
    counter) and ``reads_count_ref [1]`` (kernel 3's, :mod:`pallas_kernels.gpu.decode`) and the
    Eq. 9 sums ``block_sums_ref [G', tiles * tile / (l'/d)]``."""
    chunk = pl.program_id(0)
    visible = jnp.minimum(_visible_tokens(length_ref[0] - 1, geo), geo.slots)
    dv_cols = lanes(geo.dv, geo.dv_padded)
    head_rows = lanes(geo.group, geo.rows)
    q = load_pieces(q_ref, slice(None), geo.dk, head_rows)
    first = chunk * geo.chunk
    offsets = jnp.arange(geo.tile)
    in_last_block = offsets >= geo.tile - geo.ratio
    block_lanes = jnp.arange(geo.blocks_per_tile)
    own_weights, back_weights = (_offset_weights(w) for w in geo.eq9_weights)
    # [1, J, J]: block b's back share comes from block b - 1, block 0's from block J - 1.
    from_prior = block_lanes[None, :, None] == (block_lanes[None, None, :] + 1) % geo.blocks_per_tile

    def body(i, carry):
        acc, row_max, row_sum, before = carry
        slots = first + i * geo.tile + offsets
        seen = (slots >= 0) & (slots < visible)
        # Tile -1 reads only the keys of its last block, for the back share of block 0.
        read = seen & ((i >= 0) | in_last_block)
        valid = seen & (i >= 0)
        rows = pl.ds(first + i * geo.tile, geo.tile)
        k = load_pieces(k_ref, rows, geo.dk, read)
        v = load(v_ref.at[rows, :], tile_mask(valid, dv_cols))
        s = dot_nt_pieces(q, k, geo.precision)
        s2 = jnp.where(read[None, :], s * (geo.scale * LOG2E), MASKED)
        new_max = jnp.maximum(row_max, jnp.max(s2, axis=1))
        p = jnp.where(valid[None, :], jnp.exp2(s2 - new_max[:, None]), 0.0)
        by_block = p.reshape(geo.rows, geo.blocks_per_tile, geo.ratio)
        block_sums = jnp.sum(by_block * own_weights, axis=2)
        if geo.has_back:
            # Every back share takes the same form, relative to this tile's running maximum:
            # block b's from block b - 1 of this tile, block 0's from the last block of the
            # tile before, whose logits are carried (all masked but the last block's).
            p_before = jnp.where(before > MASKED, jnp.exp2(before - new_max[:, None]), 0.0)
            backs = jnp.where(
                block_lanes[None, :] == geo.blocks_per_tile - 1,
                jnp.sum(p_before.reshape(by_block.shape) * back_weights, axis=2),
                jnp.sum(by_block * back_weights, axis=2),
            )
            # Rotated one block on: block b takes the back share of block b - 1 (mod J).
            block_sums = block_sums + jnp.sum(jnp.where(from_prior, backs[:, None, :], 0.0), axis=2)
            before = jnp.where(in_last_block[None, :], s2, MASKED)

        @pl.when(i >= 0)
        def _write():
            block_sums_ref[:, pl.ds(i * geo.blocks_per_tile, geo.blocks_per_tile)] = block_sums
            tile_max_ref[pl.ds(i, 1), :] = new_max[None, :]

        alpha = jnp.exp2(row_max - new_max)
        row_sum = row_sum * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, geo.precision)
        return acc, new_max, row_sum, before

    # Tiles from the first holding no Eq. 9 share of a visible token on are skipped; their sums
    # stay unwritten and are never read.
    tiles = jnp.clip(
        jax.lax.div(_covered(visible, geo) - first + geo.tile - 1, geo.tile), 0, geo.tiles_per_chunk
    )
    init = (
        jnp.zeros((geo.rows, geo.dv_padded), jnp.float32),
        jnp.full((geo.rows,), MASKED, jnp.float32),
        jnp.zeros((geo.rows,), jnp.float32),
        jnp.full((geo.rows, geo.tile), MASKED, jnp.float32),
    )
    lowest = -jnp.minimum(chunk, 1) if geo.has_back else 0
    acc, row_max, row_sum, _ = jax.lax.fori_loop(lowest, tiles, body, init)
    max_ref[...] = row_max
    sum_ref[...] = row_sum
    acc_ref[...] = acc
    count_ref[...] = jnp.zeros((1,), jnp.int32)
    reads_count_ref[...] = jnp.zeros((1,), jnp.int32)


def _covered(visible: jax.Array, geo: _StepGeometry) -> jax.Array:
    """Compressed tokens whose tiles kernel 1 writes: the visible ones, and one more where Eq. 9
    gives a block a share of the block before (``l > d``), so that the block after the last
    visible token gets that share also when it starts a tile."""
    return visible + int(geo.has_back)


def _block_terms(
    geo: _StepGeometry, block_sums_ref, tile_max_ref, blocks, rows, head_rows
) -> tuple[jax.Array, ...]:
    """Kernel 1's Eq. 9 sums of ``blocks`` (int32 ``[J]``) and query heads ``rows`` (int32
    ``[R]``, ``head_rows`` marking the real ones) with their tiles' running maxima:
    ``(in_range [J], sums [R, J], tile_max [R, J])``, ``in_range`` marking the blocks kernel 1
    has columns for. Their addresses do not depend on the query's position, so these loads are
    issued before the position and the log-sum-exp arrive; sums of tiles kernel 1 skipped (past
    the query) are loaded unwritten and masked by :func:`_block_importance`."""
    in_range = blocks < geo.block_columns
    mask = head_rows[:, None] & in_range[None, :]
    safe = jnp.where(in_range, blocks, 0)
    sums = plt.load(block_sums_ref.at[rows[:, None], safe[None, :]], mask=mask, other=0)
    tile = jax.lax.div(safe, geo.blocks_per_tile)
    tile_max = plt.load(tile_max_ref.at[tile[None, :], rows[:, None]], mask=mask, other=0)
    return in_range, sums, tile_max


def _block_importance(geo: _StepGeometry, blocks, terms, lse2, head_rows, visible) -> jax.Array:
    """Importance (Eqs. 9-10) of ``blocks`` from :func:`_block_terms` of the heads with
    log2-sum-exp ``lse2 [R]``: float32 ``[J]``, their sum over those heads."""
    in_range, sums, tile_max = terms
    # A tile kernel 1 skipped holds nothing.
    tile_start = jax.lax.div(blocks, geo.blocks_per_tile) * geo.tile
    mask = head_rows[:, None] & (in_range & (tile_start < _covered(visible, geo)))[None, :]
    return jnp.sum(jnp.where(mask, jnp.exp2(tile_max - lse2[:, None]) * sums, 0.0), axis=0)


def _log2_sum_exp(maxes: jax.Array, sums: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Kernel 1's partials ``maxes``/``sums [P, R]`` (log2 units) merged per head: ``(max, sum,
    log2-sum-exp)``, each float32 ``[R]``."""
    row_max = jnp.max(maxes, axis=0)
    row_sum = jnp.sum(sums * jnp.exp2(maxes - row_max[None, :]), axis=0)
    nonempty = row_sum > 0
    # With nothing visible every probability is masked, any finite value does.
    lse2 = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, row_sum, 1.0)) * LOG2E, 0.0)
    return row_max, row_sum, lse2


def _merge_columns(geo: _StepGeometry, part, parts: int, max_ref, acc_ref, out_ref, row_max, row_sum) -> None:
    """Writes columns ``[part * C, (part + 1) * C)`` of the merged compressed output, ``C =
    Dv' / parts`` (``parts`` at most :attr:`_StepGeometry.merge_parts`), in slices of
    ``merge_width`` columns: one load of ``[P, G', W]`` each."""
    weights = jnp.exp2(max_ref[...] - row_max[None, :])
    norm = jnp.where(row_sum > 0, row_sum, 1.0)
    slices = geo.dv_padded // (parts * geo.merge_width)

    def merge(i, carry):
        first = (part * slices + i) * geo.merge_width
        columns = pl.ds(first, geo.merge_width)
        acc = jnp.sum(acc_ref[:, :, columns] * weights[:, :, None], axis=0)
        lane = first + jnp.arange(geo.merge_width)
        mask = tile_mask(lanes(geo.group, geo.rows), lane < geo.dv)
        store(out_ref.at[:, columns], acc / norm[:, None], mask)
        return carry

    jax.lax.fori_loop(0, slices, merge, 0)


def _ranks(scores: jax.Array, blocks: jax.Array, column, count: int) -> jax.Array:
    """Rank of each of ``scores``/``blocks [R]`` among ``count`` (score, block) pairs, best
    first: higher score, then lower block (``lax.top_k``'s order). ``column(c, C)`` loads the
    pairs ``c * C .. c * C + C - 1`` (``C = min(_RANK_COLUMNS, count)``). int32 ``[R]``."""
    width = min(_RANK_COLUMNS, count)
    # Unrolled, with every column load issued first: one memory round trip, not count / C.
    columns = [column(c, width) for c in range(count // width)]
    rank = jnp.zeros(scores.shape, jnp.int32)
    for other_scores, other_blocks in columns:
        ahead = (other_scores[None, :] > scores[:, None]) | (
            (other_scores[None, :] == scores[:, None]) & (other_blocks[None, :] < blocks[:, None])
        )
        rank = rank + jnp.sum(ahead.astype(jnp.int32), axis=1)
    return rank


def _ranking_scores(geo: _StepGeometry, blocks: jax.Array, importance: jax.Array, current) -> jax.Array:
    """Eq. 11's ranking score of ``blocks``: ``inf`` for the forced initial and local blocks,
    the ``importance`` for the other blocks up to the query's, ``_UNAVAILABLE`` past it."""
    forced = (blocks < geo.num_initial_blocks) | (blocks > current - geo.num_local_blocks)
    return jnp.where(blocks <= current, jnp.where(forced, jnp.inf, importance), _UNAVAILABLE)


def _best_lanes(scores: jax.Array, count: int) -> jax.Array:
    """Lanes of the ``count`` best ``scores [K]`` in rank order (``count`` argmax reductions,
    lowest lane on ties, as ``lax.top_k``): int32 ``[count]``."""
    lanes_ = jnp.arange(scores.shape[0])
    slots = jnp.arange(count)

    def pick(i, carry):
        remaining, best = carry
        lane = jnp.argmax(remaining).astype(jnp.int32)
        best = jnp.where(slots == i, lane, best)
        return jnp.where(lanes_ == lane, _TAKEN, remaining), best

    return jax.lax.fori_loop(0, count, pick, (scores, jnp.zeros((count,), jnp.int32)))[1]


def _ascending(geo: _StepGeometry, picks: jax.Array) -> jax.Array:
    """``picks [n']`` (``-1`` for none) sorted ascending with ``-1`` last."""
    lanes_ = jnp.arange(geo.picks_padded)
    key = jnp.where(picks < 0, padded(geo.num_blocks), picks)
    before = (key[None, :] < key[:, None]) | (
        (key[None, :] == key[:, None]) & (lanes_[None, :] < lanes_[:, None])
    )
    rank = jnp.sum(before.astype(jnp.int32), axis=1)
    return jnp.sum(jnp.where(rank[None, :] == lanes_[:, None], picks[None, :], 0), axis=1)


def _row_picks(geo: _StepGeometry, max_ref, sum_ref, tile_max_ref, block_sums_ref, position) -> jax.Array:
    """The query's top-``n`` blocks (Eqs. 9-11) in one program: every block of the row scored
    from kernel 1's partials and Eq. 9 sums (refs as :func:`_select_kernel`'s), ``heads_per_load``
    heads at a time, then ``n'`` argmax rounds over the row; int32 ``[n']``, ascending, ``-1``
    last. The same order as kernel 2's (forced blocks first, then by importance, lowest block
    on ties)."""
    blocks = jnp.arange(geo.row_blocks)
    visible = jnp.minimum(_visible_tokens(position, geo), geo.slots)
    importance = jnp.zeros((geo.row_blocks,), jnp.float32)
    for first in range(0, geo.rows, geo.heads_per_load):
        heads = pl.ds(first, geo.heads_per_load)
        rows = first + jnp.arange(geo.heads_per_load)
        head_rows = rows < geo.group
        terms = _block_terms(geo, block_sums_ref, tile_max_ref, blocks, rows, head_rows)
        lse2 = _log2_sum_exp(max_ref[:, heads], sum_ref[:, heads])[2]
        importance = importance + _block_importance(geo, blocks, terms, lse2, head_rows, visible)
    current = jax.lax.div(position, geo.selection_block_size)
    best = _best_lanes(_ranking_scores(geo, blocks, importance, current), geo.picks_padded)
    # Blocks 0..current all score >= 0, above every block past the query, so the first
    # min(n, current + 1) ranks are the picks.
    rank = jnp.arange(geo.picks_padded)
    return _ascending(geo, jnp.where((rank < geo.num_selected) & (rank <= current), best, -1))


def _select_kernel(
    length_ref,
    max_ref,
    sum_ref,
    acc_ref,
    tile_max_ref,
    _count_in,
    block_sums_ref,
    out_ref,
    picks_ref,
    scores_ref,
    blocks_ref,
    count_ref,
    *,
    geo,
):
    """One (part, KV head, sequence): partials ``max_ref``/``sum_ref [P, G']``,
    ``acc_ref [P, G', Dv']``, kernel 1's ``tile_max_ref [tiles, G']`` and Eq. 9 sums
    ``block_sums_ref [G', Nc]``; writes a column slice of ``out_ref [G', Dv']``, its candidate
    blocks ``blocks_ref [Q * c]`` with their ranking scores ``scores_ref [Q * c]`` and, in the
    program that draws the last ticket of ``count_ref [1]`` (aliased to ``_count_in``),
    ``picks_ref [n']``."""
    part = pl.program_id(0)
    rows = jnp.arange(geo.rows)
    head_rows = rows < geo.group
    first_block = part * geo.blocks_per_part
    blocks = first_block + jnp.arange(geo.blocks_per_part)
    terms = _block_terms(geo, block_sums_ref, tile_max_ref, blocks, rows, head_rows)
    position = length_ref[0] - 1
    visible = jnp.minimum(_visible_tokens(position, geo), geo.slots)
    row_max, row_sum, lse2 = _log2_sum_exp(max_ref[...], sum_ref[...])

    current = jax.lax.div(position, geo.selection_block_size)
    importance = _block_importance(geo, blocks, terms, lse2, head_rows, visible)
    # The part's best candidates_per_part blocks, best first, at slots part * c ...
    scores = _ranking_scores(geo, blocks, importance, current)
    best = _best_lanes(scores, geo.candidates_per_part)
    slots = pl.ds(part * geo.candidates_per_part, geo.candidates_per_part)
    blocks_ref[slots] = first_block + best
    # One masked sum for all the picks' scores, not a second reduction in every argmax round.
    lanes_ = jnp.arange(geo.blocks_per_part)
    scores_ref[slots] = jnp.sum(jnp.where(lanes_[None, :] == best[:, None], scores[None, :], 0.0), axis=1)
    if not geo.interpret:
        # Every thread's candidate stores before the ticket (released by one thread).
        plt.debug_barrier()
    ticket = plt.atomic_add(count_ref, jnp.int32(0), jnp.int32(1))

    # After the ticket: the last part's pick does not read the merged output.
    @pl.when(part < geo.merge_parts)
    def _merge():
        _merge_columns(geo, part, geo.merge_parts, max_ref, acc_ref, out_ref, row_max, row_sum)

    @pl.when(ticket == geo.parts - 1)
    def _pick():
        # ... ranked together here. Blocks 0..current all score >= 0, above every block past
        # the query, so the first min(n, current + 1) ranks are the picks.
        blocks = blocks_ref[...]

        def candidate_column(c, width):
            column = pl.ds(c * width, width)
            return scores_ref[column], blocks_ref[column]

        rank = _ranks(scores_ref[...], blocks, candidate_column, geo.candidates)
        chosen = (rank < geo.num_selected) & (rank <= current)
        by_rank = jnp.arange(geo.picks_padded)
        picks = jnp.sum(
            jnp.where(chosen[None, :] & (rank[None, :] == by_rank[:, None]), blocks[None, :] + 1, 0), axis=1
        )
        store(picks_ref, _ascending(geo, picks - 1), lanes(geo.num_selected, geo.picks_padded))


def _select_read_kernel(
    length_ref,
    max_ref,
    sum_ref,
    acc_ref,
    tile_max_ref,
    block_sums_ref,
    q_ref,
    k_ref,
    v_ref,
    _count_in,
    compressed_ref,
    picks_ref,
    *read_refs,
    geo,
    reads,
):
    """Kernel 2 of :func:`whole_step`, one (program, KV head, sequence) of the reads
    (:func:`pallas_kernels.gpu.decode.read_and_merge`, ``read_refs`` its outputs, the counter
    aliased to ``_count_in``): a selected-block program first picks the row's blocks
    (:func:`_row_picks`; the first one writes them to ``picks_ref [n']``); a window program,
    which needs no picks, first writes its column slice of the merged compressed output
    ``compressed_ref [G', Dv']``. Kernel 1's outputs as :func:`_select_kernel`'s."""
    program = pl.program_id(0)
    position = length_ref[0] - 1
    refs = (q_ref, k_ref, v_ref, *read_refs)

    @pl.when(program < reads.selected_programs)
    def _selected():
        picks = _row_picks(geo, max_ref, sum_ref, tile_max_ref, block_sums_ref, position)

        @pl.when(program == 0)
        def _write_picks():
            store(picks_ref, picks, lanes(geo.num_selected, geo.picks_padded))

        decode.read_and_merge(reads, program, position, picks, *refs)

    @pl.when(program >= reads.selected_programs)
    def _window():
        part = program - reads.selected_programs
        parts = _merge_parts_of(geo, reads)

        @pl.when(part < parts)
        def _merge():
            row_max, row_sum, _ = _log2_sum_exp(max_ref[...], sum_ref[...])
            _merge_columns(geo, part, parts, max_ref, acc_ref, compressed_ref, row_max, row_sum)

        decode.read_and_merge(reads, program, position, jnp.full((geo.picks_padded,), -1, jnp.int32), *refs)


def _merge_parts_of(geo: _StepGeometry, reads) -> int:
    """Window programs of :func:`_select_read_kernel` that merge the compressed output: a power
    of two of them, each an equal slice of ``merge_width`` columns."""
    return min(_largest_power_of_two(reads.window_programs), geo.dv_padded // geo.merge_width)


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
    ratio = kwargs["selection_block_size"] // kwargs["block_stride"]
    # A tile holds whole selection blocks.
    launch = (max(launch[0], ratio), *launch[1:])
    rows = batch * kv_heads
    tiles = -(-slots // launch[0])
    chunks = min(pl.next_power_of_2(tiles), _largest_power_of_two(launch[3] // rows))
    blocks = padded(-(-slots * kwargs["block_stride"] // kwargs["selection_block_size"]))
    picks = padded(kwargs["num_selected"])
    # Parts of at least 16 and at most _PART_BLOCKS blocks, near the target programs while the
    # last program ranks at most max(_CANDIDATES, n') candidates.
    fitting = min(
        _largest_power_of_two(select_launch[1] // rows), max(_CANDIDATES, picks) // picks, blocks // 16
    )
    parts = max(fitting, blocks // _PART_BLOCKS)
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
    """Kernel 1: partials ``[B, H, P, G']`` (max, sum), ``[B, H, P, G', Dv']`` (acc), the
    tiles' running maxima ``[B, H, tiles, G']``, the zeroed counters of kernels 2 and 3
    (``[B, H, 1]`` each) and the Eq. 9 sums ``[B, H, G', Nc]``."""
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
            pl.BlockSpec((None, None, geo.tiles_per_chunk, geo.rows), lambda p, h, b: (b, h, p, 0)),
            per_sequence_block(1),
            per_sequence_block(1),
            pl.BlockSpec(
                (None, None, geo.rows, geo.tiles_per_chunk * geo.blocks_per_tile),
                lambda p, h, b: (b, h, 0, p),
            ),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct((*shape, geo.dv_padded), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.num_tiles, geo.rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, 1), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads, 1), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.rows, geo.block_columns), jnp.float32),
        ],
        compiler_params=plt.CompilerParams(num_warps=geo.launch[1], num_stages=geo.launch[2]),
        interpret=geo.interpret,
        name="nsa_decode_compressed",
    )(lengths[:, None], q4, k_cmp, v_cmp)


def _kernel_one_specs(geo: _StepGeometry) -> list[pl.BlockSpec]:
    """Blocks of kernel 1's outputs that the kernels after it read, per (sequence, KV head): the
    partials' maxima, sums and accumulators, the tiles' running maxima and the Eq. 9 sums."""
    return [
        per_sequence_block(geo.chunks, geo.rows),
        per_sequence_block(geo.chunks, geo.rows),
        per_sequence_block(geo.chunks, geo.rows, geo.dv_padded),
        per_sequence_block(geo.num_tiles, geo.rows),
        per_sequence_block(geo.rows, geo.block_columns),
    ]


def _select_pass(geo: _StepGeometry, lengths, partials, out_dtype):
    """Kernel 2: compressed output ``[B, H, G, Dv]`` and sorted picks ``[B, H, n]``."""
    row_max, row_sum, acc, tile_max, counts, _, block_sums = partials
    batch, kv_heads = row_max.shape[:2]
    *partials_specs, sums_spec = _kernel_one_specs(geo)
    out, picks, *_ = pl.pallas_call(
        functools.partial(_select_kernel, geo=geo),
        grid=(geo.parts, kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, 1), lambda q, h, b: (b, 0)),
            *partials_specs,
            per_sequence_block(1),
            sums_spec,
        ],
        out_specs=[
            per_sequence_block(geo.rows, geo.dv_padded),
            per_sequence_block(geo.picks_padded),
            per_sequence_block(geo.candidates),
            per_sequence_block(geo.candidates),
            per_sequence_block(1),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, geo.group, geo.dv), out_dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.num_selected), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.candidates), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.candidates), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads, 1), jnp.int32),
        ],
        input_output_aliases={5: 4},
        compiler_params=plt.CompilerParams(num_warps=geo.select_launch[0], num_stages=1),
        interpret=geo.interpret,
        name="nsa_decode_select",
    )(lengths[:, None], row_max, row_sum, acc, tile_max, counts, block_sums)
    return out, picks


def _select_and_read(geo: _StepGeometry, reads, launch, lengths, partials, q, keys, values):
    """Kernel 2 of :func:`whole_step` (:func:`_select_read_kernel`): compressed, selected and
    window outputs ``[B, H, G, Dv]`` each, and the picks ``[B, H, n]``."""
    row_max, row_sum, acc, tile_max, _, counters, block_sums = partials
    batch, kv_heads = row_max.shape[:2]
    in_specs, out_specs, out_shape = decode.reads_specs(reads, batch, kv_heads, q.dtype)
    compressed, picks, out, *_ = pl.pallas_call(
        functools.partial(_select_read_kernel, geo=geo, reads=reads),
        grid=(reads.programs, kv_heads, batch),
        in_specs=[pl.BlockSpec((None, 1), lambda p, h, b: (b, 0)), *_kernel_one_specs(geo), *in_specs],
        out_specs=[
            per_sequence_block(geo.rows, geo.dv_padded),
            per_sequence_block(geo.picks_padded),
            *out_specs,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, geo.group, geo.dv), q.dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, geo.num_selected), jnp.int32),
            *out_shape,
        ],
        input_output_aliases={9: 6},
        compiler_params=plt.CompilerParams(num_warps=launch[0], num_stages=launch[1]),
        interpret=geo.interpret,
        name="nsa_decode_select_read",
    )(
        lengths[:, None],
        row_max,
        row_sum,
        acc,
        tile_max,
        block_sums,
        q.reshape(batch, kv_heads, geo.group, geo.dk),
        keys,
        values,
        counters,
    )
    return compressed, out[0], out[1], picks


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
    :func:`compressed_and_selection`. Returns the partials, maxima, counters and Eq. 9 sums kernel 2 reads."""
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


@functools.partial(
    jax.jit,
    static_argnames=(*(n for n in _STATIC if n != "select_launch"), "window", "reads_launch", "return_picks"),
)
def whole_step(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    lengths: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    window: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
    launch: tuple[int, int, int, int] | None = None,
    reads_launch: tuple[int, int, int, int] | None = None,
    interpret: bool = False,
    return_picks: bool = False,
) -> tuple[jax.Array, ...]:
    """One decode step's three branch outputs in two launches: kernel 1, then the selection
    and the reads in one kernel (``nsa_decode_select_read``, see the module docstring), whose
    counters kernel 1 zeroes (no XLA memset between the launches); see
    :func:`nsa_jax.decoding.decode_step_at`.

    Args:
      q: ``[B, HQ, Dk]``; keys: ``[3, B, S, H, Dk]`` and values ``[3, B, S, H, Dv]`` (branch 1
        selected, 2 window); k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]``; lengths: int
        ``[B]`` in ``[1, min(S, Tc * d)]``, the query of row ``b`` at ``lengths[b] - 1``.
      launch: kernel 1's, as :func:`compressed_and_selection`'s; reads_launch: the second
        kernel's, as :func:`pallas_kernels.gpu.decode.selected_and_window`'s ``launch``; ``None``
        for the defaults.
      return_picks: also return the picked blocks (for checks and benchmarks).

    Returns:
      ``(compressed, selected, window)``, each ``[B, HQ, Dv]`` in ``q.dtype``, and with
      ``return_picks`` the block indices, int32 ``[B, H, n]``, ascending, ``-1`` last.
    """
    geo = _geometry(
        q,
        k_cmp,
        v_cmp,
        launch,
        None,
        interpret=interpret,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=float(scale),
    )
    reads_launch = decode.DEFAULT_LAUNCH if reads_launch is None else reads_launch
    reads = decode.reads_geometry(
        q,
        values,
        num_selected,
        block_size=selection_block_size,
        window=window,
        scale=scale,
        launch=reads_launch,
        interpret=interpret,
    )
    lengths = lengths.astype(jnp.int32)
    partials = _compressed_pass(geo, q, k_cmp, v_cmp, lengths)
    *outputs, picks = _select_and_read(geo, reads, reads_launch, lengths, partials, q, keys, values)
    outputs = tuple(o.reshape(q.shape[0], -1, geo.dv) for o in outputs)
    return (*outputs, picks) if return_picks else outputs


def check_whole_step(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    lengths: jax.Array,
    **kwargs,
) -> None:
    """:func:`check` for :func:`whole_step`'s arguments."""
    del keys, values
    check(q, k_cmp, v_cmp, lengths, **kwargs)


def check(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, lengths: jax.Array, **kwargs) -> None:
    """Raises ``ValueError`` for inputs these kernels do not serve (other dtypes, ``Tc = 0``,
    ``l' / d`` not a power of two: kernel 1's tiles hold whole selection blocks)."""
    del v_cmp, lengths
    require_supported_dtype(q)
    if k_cmp.shape[1] == 0:
        raise ValueError("k_cmp must hold at least one compressed token (axis 1) for pallas_triton")
    ratio = kwargs["selection_block_size"] // kwargs["block_stride"]
    if ratio & (ratio - 1):
        raise ValueError(
            "selection_block_size / block_stride must be a power of two for pallas_triton's decode "
            f"kernels, got {kwargs['selection_block_size']} / {kwargs['block_stride']}"
        )
