"""Block importance (spec, "Selection scores (Eqs. 8-10)") in Pallas Mosaic GPU (Hopper: TMA, wgmma).

The scoring half of :func:`nsa_jax.select_blocks`: each position's importance of every selection
block, float32 ``[B, T, H, Nb]``; the top-n (Eq. 11) is then :mod:`pallas_kernels.gpu.top_n`'s
kernel, which breaks ties as the reference (the lower block first).

One program per tile of ``P`` positions, KV head and batch row (late tiles first). Its 64 MMA
rows are ``R = 64 / P`` head groups times the ``P`` positions: row ``g * P + p`` is position ``p``
with query heads ``g, g + R, ..`` (``G / R`` of them). It holds the queries of its positions in
shared memory and walks key tiles of 64 compressed tokens (``64 / r`` selection blocks, ``r = l'/d``
tokens each), double-buffered by TMA. Per key tile:

1. ``S = Q K^T`` for each of the ``G / R`` heads a row holds, ``p = exp2(S * scale * log2 e -
   lse2)`` (Eq. 8), summed over those heads into ``g [64, 64]`` (float32; invisible tokens zeroed).
2. Eq. 9 as an MMA with a constant ``[64 tokens, 2b]`` weight matrix (:func:`eq9_weights`):
   columns ``0 .. b-1`` give each block's own tokens with their weights, ``b + c`` (``c >= 1``)
   the terms block ``c`` takes from the block before (inside the tile), and ``b`` (block 0 has
   no such term inside the tile) the term the next tile's first block takes from this tile's last
   (carried to the next tile). ``g`` goes into the MMA as two float16 pieces (``g * 2^s = hi +
   lo``, exact to about ``2^-22`` relative), so the weighted sums keep float32 precision; every
   block's importance is then ``own + back``, its back term from this tile's column or, for block
   0, the carry: the same float32 operations for every block, so equal inputs give equal
   importance (exact ties).
3. The ``R`` head groups' rows are summed through shared memory (Eq. 10) and the tile's
   ``[P, b]`` importances are stored by TMA.

Tiles past the last block a position can see are not written (the top-n masks them). Key tiles
that every position of the program sees wholly skip the visibility mask.

On the H200 at T = 64K (experiments/results/session28_h200.md): 5.4 ms at Dk = 128 and 7.7 at
Dk = 192 (with the top-n kernel, 6.4 / 8.7 ms, against 9.0 / 13.6 for the Triton kernel of
:mod:`pallas_kernels.gpu.select_blocks`). Under ncu it is latency-bound: 2 programs (8 warps) an
SM, limited by registers and shared memory; tensor pipe 51% busy.

Served: bf16 / float16, no segments, ``G = 16``, ``Dk`` a multiple of 64 up to 256, ``r = l'/d``
2 or 4 (an MMA of 64 or 32 columns), Eq. 9 reaching one block back, on a Hopper GPU or
in interpret mode (:func:`supports`). In interpret mode the Eq. 9 MMA takes ``g``'s pieces from
shared memory (the interpreter's MMAs take shared-memory operands only).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax.reference.selection import overlap_weights
from pallas_kernels.gpu import top_n
from pallas_kernels.gpu.selection_mosaic import _on_hopper
from pallas_kernels.gpu.tiles import visible_tokens

_TOKENS = 64  # compressed tokens a key tile
_ROWS = 64  # MMA rows: head groups times positions
_HEADS = 16
_SHARED_BYTES = 220 * 1024
# Float32 importances select_blocks holds at once at most (all batch rows and KV heads): 1 GiB.
# That scores every position in one launch at T = 64K, H = 4, B = 1: launches of fewer positions
# cost time there (6.51-6.53 ms against 6.32 at Dk = 128 on the H200, session 30), so longer
# inputs are the ones cut into chunks.
MAX_IMPORTANCES = 2**28


@dataclasses.dataclass(frozen=True)
class ImportanceTuning:
    """``positions``: query positions a program (``P``, 16 or 8; the head groups are ``64 / P``).
    ``overlap``: a key tile's ``S`` MMAs for all the heads a row holds issued together (one
    accumulator each) before the first exp. ``max_importances``: float32 importances
    :func:`select_blocks` holds in memory at once at most (see :func:`chunk_positions`)."""

    positions: int = 16
    overlap: bool = False
    max_importances: int = MAX_IMPORTANCES

    def __post_init__(self) -> None:
        if self.positions not in (8, 16):
            raise ValueError(f"positions must be 8 or 16, got {self.positions}")
        if self.max_importances < 1:
            raise ValueError(f"max_importances must be positive, got {self.max_importances}")


def default_tuning(dk: int) -> ImportanceTuning:
    """16 positions a program up to ``Dk = 128``, 8 above (the queries of 16 then leave room for
    one program an SM). H200, T = 64K (experiments/results/bench_importance_final_session28_h200.md):
    5.42 against 6.56 ms at Dk = 128, 7.73 against 9.23 at Dk = 192."""
    return ImportanceTuning(positions=16 if dk <= 128 else 8)


def eq9_weights(block_length: int, block_stride: int, selection_block_size: int) -> np.ndarray:
    """float32 ``[64, 2b]``: Eq. 9 on a key tile of 64 tokens (``b = 64 / r`` blocks). Row ``j`` is
    tile token ``j``; column ``c < b`` takes block ``c``'s own tokens, column ``b + c`` (``c >= 1``)
    the tokens of block ``c - 1`` that feed block ``c``, column ``b`` the tokens of block ``b - 1``
    that feed the next tile's block 0."""
    first, weights = overlap_weights(block_length, block_stride, selection_block_size)
    ratio = selection_block_size // block_stride
    blocks = _TOKENS // ratio
    out = np.zeros((_TOKENS, 2 * blocks), np.float32)
    for c in range(blocks + 1):
        for k, weight in enumerate(weights):
            token = c * ratio + first + k
            if token < 0:
                continue  # block 0's term from the tile before: that tile's column b (the carry)
            if token >= c * ratio:
                if c < blocks:
                    out[token, c] += weight
            else:
                out[token, blocks + c % blocks] += weight
    return out


def supports(
    *,
    segmented: bool,
    group: int,
    dk: int,
    dtype: str,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    interpret: bool,
) -> bool:
    """Whether this kernel serves the inputs (see the module notes)."""
    ratio, rest = divmod(selection_block_size, block_stride)
    first, _ = overlap_weights(block_length, block_stride, selection_block_size)
    geometry_ok = rest == 0 and ratio in (2, 4) and -first <= ratio
    shape_ok = not segmented and group == _HEADS and dk % 64 == 0 and dk <= 256
    fits = shape_ok and _shared_bytes(dk, default_tuning(dk)) <= _SHARED_BYTES
    return geometry_ok and fits and dtype in ("bfloat16", "float16") and (interpret or _on_hopper())


def _shared_bytes(dk: int, tuning: ImportanceTuning) -> int:
    """Queries, two key tiles, the weights and the pieces, the row sums and the output tile."""
    two = 2
    heads_a_row = _HEADS * tuning.positions // _ROWS
    return (
        heads_a_row * _ROWS * dk * two
        + 2 * _TOKENS * dk * two
        + 3 * _TOKENS * _TOKENS * two
        + _ROWS * _TOKENS * 4
        + heads_a_row * _ROWS * 4
        + tuning.positions * _TOKENS * 4
    )


def chunk_positions(importances_a_position: int, tuning: ImportanceTuning) -> int:
    """Positions :func:`select_blocks` scores in one launch: as many as ``tuning.max_importances``
    holds at ``importances_a_position`` (``B * H * ceil(T / l')``) each, a multiple of the
    program's ``P``, at least ``P``."""
    if importances_a_position < 1:
        raise ValueError(f"importances_a_position must be positive, got {importances_a_position}")
    fit = tuning.max_importances // importances_a_position
    return max(tuning.positions, fit - fit % tuning.positions)


def _padded_rows(length: int, first: int, stop: int, positions: int) -> int:
    """Rows ``q`` needs for :func:`block_importance` to score positions ``first .. stop - 1`` with
    programs of ``positions`` positions: a multiple of ``positions``, at least ``length``."""
    needed = first + -(-(stop - first) // positions) * positions
    return -(-max(length, needed) // positions) * positions


def _scores(q_smem, k_smem, acc):
    """``S = Q K^T`` of one head into ``acc``, read back."""
    plgpu.wgmma(acc, q_smem, k_smem.T)
    return acc[...]


def block_importance(
    q: jax.Array,
    k_cmp: jax.Array,
    lse: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    scale: float,
    interpret: bool = False,
    tuning: ImportanceTuning | None = None,
    position_range: tuple[int, int] | None = None,
) -> jax.Array:
    """Each position's importance of each selection block (Eqs. 8-10), unsegmented.

    Args:
      q: ``[B, T, HQ, Dk]`` (bf16 or float16, ``HQ = 16 H``); k_cmp: ``[B, Tc, H, Dk]``;
        lse: float32 ``[B, T, HQ]`` from the compressed attention (natural log).
      interpret: run in Mosaic GPU interpret mode (CPU).
      position_range: ``(first, stop)``: score positions ``first .. stop - 1`` only
        (``0 <= first < stop <= T``); ``None``: all ``T``.

    Returns:
      float32 ``[B, stop - first, H, Nb]``, ``Nb = ceil(stop / l')`` (the blocks those positions
      can see; ``[B, T, H, ceil(T / l')]`` for all positions): entries past a position's own block
      are unspecified (the top-n never reads them; :func:`nsa_jax.reference.selection.top_blocks`
      masks them).
    """
    if q.ndim != 4 or k_cmp.ndim != 4 or k_cmp.shape[::3] != (q.shape[0], q.shape[3]):
        raise ValueError(
            f"q [B, T, HQ, Dk] and k_cmp [B, Tc, H, Dk] must share B and Dk, got {q.shape} and {k_cmp.shape}"
        )
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be [B, T, HQ] = {q.shape[:3]}, got {lse.shape}")
    batch, length, q_heads, dk = q.shape
    first_position, stop = (0, length) if position_range is None else position_range
    if not 0 <= first_position < stop <= length:
        raise ValueError(
            f"position_range must satisfy 0 <= first < stop <= T = {length}, got {position_range}"
        )
    tuning = default_tuning(dk) if tuning is None else tuning
    slots, heads = k_cmp.shape[1], k_cmp.shape[2]
    group = q_heads // heads
    if group != _HEADS:
        raise ValueError(f"q must have {_HEADS} query heads per KV head (HQ / H), got {group}")
    ratio = selection_block_size // block_stride
    blocks_a_tile = _TOKENS // ratio
    columns = 2 * blocks_a_tile
    num_blocks = -(-stop // selection_block_size)
    key_tiles = -(-num_blocks // blocks_a_tile)
    positions = tuning.positions
    head_groups = _ROWS // positions
    heads_a_row = _HEADS // head_groups
    query_tiles = -(-(stop - first_position) // positions)
    padded_count = query_tiles * positions
    dtype = q.dtype
    log2_scale = scale * math.log2(math.e)
    # g <= heads_a_row (p <= 1): scaled below float16's largest finite value.
    piece_scale = float(2 ** (14 - (heads_a_row - 1).bit_length()))
    inline = interpret

    q5 = jax.lax.stop_gradient(q).reshape(batch, length, heads, _HEADS, dk)
    k_cmp = jax.lax.stop_gradient(k_cmp)
    lse2 = jax.lax.stop_gradient(lse).astype(jnp.float32)
    # As the reference: a non-finite lse (nothing visible) reads as 0.
    lse2 = jnp.where(jnp.isfinite(lse2), lse2 * math.log2(math.e), 0.0)
    # The programs read q rows up to first + padded_count, and TMA takes q's rows in whole tiles
    # of P; lse only for their own positions.
    q_pad = _padded_rows(length, first_position, stop, positions) - length
    if q_pad > 0:
        q5 = jnp.pad(q5, ((0, 0), (0, q_pad), (0, 0), (0, 0), (0, 0)))
    lse2 = lse2[:, first_position:stop]
    lse2 = jnp.pad(lse2, ((0, 0), (0, padded_count - lse2.shape[1]), (0, 0)))
    # Row g * P + p of a tile's MMA for its i-th head: position p, query head i * R + g.
    lse_rows = lse2.reshape(batch, query_tiles, positions, heads, heads_a_row, head_groups)
    lse_rows = jnp.transpose(lse_rows, (0, 3, 1, 4, 5, 2)).reshape(
        batch, heads, query_tiles, heads_a_row, _ROWS
    )
    kept = min(slots, key_tiles * _TOKENS)
    k_tiles = jnp.pad(k_cmp[:, :kept], ((0, 0), (0, key_tiles * _TOKENS - kept), (0, 0), (0, 0)))
    weights = jnp.asarray(eq9_weights(block_length, block_stride, selection_block_size), jnp.float16)

    def kernel(
        q_ref, k_ref, lse_ref, w_ref, out_ref,
        q_smem, k_smem, lse_smem, w_smem, piece_smem, rows_smem, out_smem, q_barrier, k_barrier,
    ):  # fmt: skip
        tile = jax.lax.axis_index("tile")
        head = jax.lax.axis_index("head")
        b = jax.lax.axis_index("batch")
        query_tile = query_tiles - 1 - tile
        first = first_position + query_tile * positions
        for i in range(heads_a_row):
            for g in range(head_groups):
                plgpu.copy_gmem_to_smem(
                    q_ref.at[b, pl.ds(first, positions), head, i * head_groups + g],
                    q_smem.at[i, pl.ds(g * positions, positions)],
                    q_barrier,
                )
        plgpu.copy_gmem_to_smem(lse_ref.at[b, head, query_tile], lse_smem, q_barrier)
        plgpu.copy_gmem_to_smem(w_ref, w_smem, q_barrier)
        last = jnp.minimum(first + positions, stop) - 1
        tiles = jnp.minimum(
            jax.lax.div(jax.lax.div(last, selection_block_size), blocks_a_tile) + 1, key_tiles
        )

        def fetch(i):
            plgpu.copy_gmem_to_smem(
                k_ref.at[b, pl.ds(i * _TOKENS, _TOKENS), head],
                k_smem.at[jax.lax.rem(i, 2)],
                k_barrier.at[jax.lax.rem(i, 2)],
            )

        fetch(0)
        plgpu.barrier_wait(q_barrier)
        first_block = (
            plgpu.broadcasted_iota(jnp.int32, (_ROWS, blocks_a_tile), 1, layout=plgpu.Layout.WGMMA) == 0
        )
        # Row vectors, broadcast where used: [64, 64] copies would hold 32 registers each.
        lse_by_head = [
            plgpu.load(lse_smem.at[i], layout=plgpu.Layout.WGMMA.reduce(1)) for i in range(heads_a_row)
        ]

        def visible_count(position):
            return jnp.minimum(visible_tokens(position, block_length, block_stride), slots)

        def visible(i):
            """Whether each row's position sees each token of key tile ``i`` (Eqs. 7-8)."""
            iota = functools.partial(
                plgpu.broadcasted_iota, jnp.int32, (_ROWS, _TOKENS), layout=plgpu.Layout.WGMMA
            )
            count = visible_count(first + jax.lax.rem(iota(0), positions))
            return i * _TOKENS + iota(1) < count

        def key_tile(i, carry, masked: bool):
            slot = jax.lax.rem(i, 2)

            @pl.when(i + 1 < tiles)
            def _():
                fetch(i + 1)

            plgpu.barrier_wait(k_barrier.at[slot])

            def probabilities(*accs):
                """``p`` summed over the heads a row holds. With ``tuning.overlap`` every head's
                ``S`` MMA is issued first, so that the exps of one head overlap the next's MMAs."""
                for h, acc in enumerate(accs):
                    plgpu.wgmma(acc, q_smem.at[h], k_smem.at[slot].T)
                g = None
                for h in range(heads_a_row):
                    if accs:
                        s = (
                            accs[h][...]
                            if inline
                            else plgpu.wgmma_accumulator_load(accs[h], wait_n=len(accs) - 1 - h)
                        )
                    else:
                        s = pl.run_scoped(
                            functools.partial(_scores, q_smem.at[h], k_smem.at[slot]),
                            plgpu.ACC((_ROWS, _TOKENS), jnp.float32),
                        )
                    p = jnp.exp2(s * log2_scale - jax.lax.broadcast_in_dim(lse_by_head[h], s.shape, [0]))
                    g = p if g is None else g + p
                return g

            if tuning.overlap:
                g = pl.run_scoped(probabilities, *([plgpu.ACC((_ROWS, _TOKENS), jnp.float32)] * heads_a_row))
            else:
                g = probabilities()
            if masked:
                g = jnp.where(visible(i), g, 0.0)
            g = g * piece_scale
            hi = g.astype(jnp.float16)
            lo = (g - hi.astype(jnp.float32)).astype(jnp.float16)
            if inline:
                piece_smem[0] = hi
                piece_smem[1] = lo
                plgpu.commit_smem()
                hi, lo = piece_smem.at[0], piece_smem.at[1]

            def eq9(acc):
                plgpu.wgmma(acc, hi, w_smem)
                plgpu.wgmma(acc, lo, w_smem)
                return acc[...]

            sums = pl.run_scoped(eq9, plgpu.ACC((_ROWS, columns), jnp.float32)) * (1.0 / piece_scale)
            own, back = sums[:, :blocks_a_tile], sums[:, blocks_a_tile:]
            # Column b holds the next tile's first block's term; this tile's comes from the last.
            importance = own + jnp.where(first_block, carry, back)
            rows_smem[...] = importance
            plgpu.commit_smem()
            total = None
            for group_ in range(head_groups):
                part = rows_smem[pl.ds(group_ * positions, positions), :]
                total = part if total is None else total + part
            # The last tile's store must have read out_smem before it is overwritten.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem[...] = total
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem,
                out_ref.at[
                    b, pl.ds(query_tile * positions, positions), head, pl.ds(i * blocks_a_tile, blocks_a_tile)
                ],
            )
            return back

        carry = plgpu.layout_cast(jnp.zeros((_ROWS, blocks_a_tile), jnp.float32), plgpu.Layout.WGMMA)
        # The first position sees the fewest tokens: the tiles it sees wholly need no mask.
        full = jnp.minimum(jax.lax.div(visible_count(first), _TOKENS), tiles)
        carry = jax.lax.fori_loop(0, full, functools.partial(key_tile, masked=False), carry)
        jax.lax.fori_loop(full, tiles, functools.partial(key_tile, masked=True), carry)
        plgpu.wait_smem_to_gmem(0)

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    transforms = (tiling, swizzle)
    scratch = [
        plgpu.SMEM((heads_a_row, _ROWS, dk), dtype, transforms=transforms),
        plgpu.SMEM((2, _TOKENS, dk), dtype, transforms=transforms),
        plgpu.SMEM((heads_a_row, _ROWS), jnp.float32),
        plgpu.SMEM(
            (_TOKENS, columns),
            jnp.float16,
            transforms=(plgpu.TilingTransform((8, columns)), plgpu.SwizzleTransform(2 * columns)),
        ),
        plgpu.SMEM((2, _ROWS, _TOKENS) if inline else (2, 8, _TOKENS), jnp.float16, transforms=transforms),
        plgpu.SMEM((_ROWS, blocks_a_tile), jnp.float32),
        plgpu.SMEM((positions, blocks_a_tile), jnp.float32),
        plgpu.Barrier(num_arrivals=heads_a_row * head_groups + 2),
        plgpu.Barrier(num_arrivals=1, num_barriers=2),
    ]
    importance = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((batch, padded_count, heads, key_tiles * blocks_a_tile), jnp.float32),
        scratch_types=scratch,
        grid=(query_tiles, heads, batch),
        grid_names=("tile", "head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="nsa_block_importance",
    )(q5, k_tiles, lse_rows, weights)
    return importance[:, : stop - first_position, :, :num_blocks]


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
    interpret: bool = False,
    tuning: ImportanceTuning | None = None,
    top_n_tuning: top_n.TopNTuning | None = None,
) -> jax.Array:
    """Top-n blocks (Eq. 11) of :func:`block_importance`'s scores: int32 ``[B, T, H, n]`` as
    :func:`nsa_jax.select_blocks` (unsegmented).

    The positions are scored in chunks of :func:`chunk_positions` (one at T = 64K, H = 4, B = 1),
    each picked (:func:`pallas_kernels.gpu.top_n.top_blocks_of_range`, over the ranges of
    :func:`pallas_kernels.gpu.top_n.position_ranges` inside it) before the next is scored: at most
    ``tuning.max_importances`` float32 importances are in memory at a time, where scoring every
    position at once would take ``B * T * H * ceil(T / l')`` of them, quadratic in ``T`` (spec,
    "Kernel design"; 1 GiB at T = 64K, H = 4, 64 GiB at 512K).
    """
    tuning = default_tuning(q.shape[-1]) if tuning is None else tuning
    top_n_tuning = top_n.TopNTuning() if top_n_tuning is None else top_n_tuning
    batch, length = q.shape[:2]
    heads = k_cmp.shape[2]
    num_blocks = -(-length // selection_block_size)
    chunk = chunk_positions(batch * heads * num_blocks, tuning)
    ranges = top_n.position_ranges(length, num_blocks, selection_block_size, top_n_tuning.narrowest)
    # Padded once here (a copy of q) where the last chunk needs it, rather than in its call.
    rows = _padded_rows(length, 0, length, tuning.positions)
    if rows > length:
        q = jnp.pad(q, ((0, 0), (0, rows - length), (0, 0), (0, 0)))
        lse = jnp.pad(lse, ((0, 0), (0, rows - length), (0, 0)))
    parts = []
    for start in range(0, length, chunk):
        end = min(length, start + chunk)
        importance = block_importance(
            q,
            k_cmp,
            lse,
            block_length=block_length,
            block_stride=block_stride,
            selection_block_size=selection_block_size,
            scale=scale,
            interpret=interpret,
            tuning=tuning,
            position_range=(start, end),
        )
        picks = [
            top_n.top_blocks_of_range(
                importance,
                first=max(first, start),
                stop=min(stop, end),
                blocks=blocks,
                rows_first=start,
                selection_block_size=selection_block_size,
                num_selected=num_selected,
                num_initial_blocks=num_initial_blocks,
                num_local_blocks=num_local_blocks,
                interpret=interpret,
                tuning=top_n_tuning,
            )
            for first, stop, blocks in ranges
            if max(first, start) < min(stop, end)
        ]
        # The next chunk is scored after these picks exist, so that its importances can reuse
        # this chunk's memory (XLA would otherwise be free to score every chunk first).
        picks, q = jax.lax.optimization_barrier((picks, q))
        parts += picks
    return jnp.concatenate(parts, axis=1)
