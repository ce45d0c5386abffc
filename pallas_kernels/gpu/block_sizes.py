"""Launch parameters and backward variants of the selected-attention kernels (Triton lowering)."""

from __future__ import annotations

import dataclasses

from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class SelectionTuning:
    """Warps, software-pipelining depth, row batching and backward variant of the kernels.

    The forward holds the ``G`` query heads of one query position (rows padded to
    ``max(16, next_pow2(G))``) against one selected key block (padded to
    ``max(16, next_pow2(block_size))``); head dims are padded to powers of two by
    masked loads.

    Attributes:
      fwd_warps, fwd_stages: forward kernel (one program per ``fwd_queries`` query positions
        and KV head).
      fwd_queries: consecutive query positions per forward program, a power of two. A block
        that all of them select (the spec's forced initial and local blocks at least, Eq. 11)
        is read once for all of them; each position's other blocks are read for it alone.
      bwd_warps, bwd_stages: backward kernel (one program per key tile and KV head).
      bwd_rows: query rows gathered per backward step, a power of two:
        ``bwd_rows / next_pow2(G)`` (query, slot) pairs of the tile's inverse-map
        list at once (at least one pair, at least 16 rows).
      bwd_rows_major: compute the backward's score tile as ``[rows, keys]`` rather
        than ``[keys, rows]``. With 8 warps the MMA splits its first dimension over
        two warp groups, so rows-major with 128 rows keeps every warp group busy,
        where 64 keys would be computed twice.
      split_head_dims: in the backward, hold a head dim as power-of-two column
        tiles (Dk=192 as 128 + 64) instead of one tile padded to a power of two
        (256): fewer registers and no MMA work on padding.
      bwd_heavy_first: launch the backward's programs heaviest first: key tiles in
        descending order of their (query, slot) count and the KV heads interleaved,
        so that the long lists of early tiles (selected by many queries) start at
        once instead of one head after another and do not make the kernel's tail.
      bwd_splits: backward programs per key tile, each taking an equal share of the
        tile's (query, slot) list and writing float32 partial dK/dV, summed
        afterwards. With the spec's selection every query selects block 0, so its
        tile's list is ``T`` pairs long, ``n`` times the mean: one program would
        run it alone long after the others end.
      dq_transposed: compute a step's dQ as ``[Dk, rows] = K^T dS^T`` rather than
        ``[rows, Dk] = dS K``, so that the MMA's first dimension is the head dim (128)
        and not the rows (32 with 4 warps, under the 64 of a Hopper warp-group MMA);
        stored through transposed index grids.
      mosaic_backward: run the backward's tile kernel in Mosaic GPU
        (:mod:`pallas_kernels.gpu.selection_mosaic`: TMA gathers by a memory warpgroup,
        warpgroup MMAs) where it serves the shape and the device (a Hopper GPU, or
        interpret mode), with ``bwd_stages`` gather slots (fewer where shared memory
        is short), ``mosaic_splits`` programs per key tile and ``bwd_heavy_first`` as for
        the Triton kernel (``bwd_warps``, ``bwd_rows``, ``bwd_splits`` and the Triton
        variants do not apply); the Triton tile kernel otherwise.
      mosaic_splits: ``bwd_splits`` of the Mosaic tile kernel. Its programs take longer
        per (query, slot) pair than the Triton kernel's, so block 0's tile (every query)
        needs more of them to stay off the kernel's tail.
      mosaic_heavy_tiles, mosaic_heavy_splits: with ``bwd_heavy_first``, the Mosaic
        kernel's ``mosaic_heavy_tiles`` longest lists of a row get ``mosaic_heavy_splits``
        programs each (more than ``mosaic_splits``; 0 tiles: every tile gets
        ``mosaic_splits``), so the other tiles can take fewer programs, and fewer partials.
      mosaic_forward: run the forward keys to queries in Mosaic GPU
        (:mod:`pallas_kernels.gpu.selection_forward_mosaic`) where the Mosaic tile kernel
        serves the shape (``mosaic_backward`` and its conditions), with ``mosaic_fwd_stages``
        query slots (even; fewer where shared memory is short) and the backward's splits and
        launch order; the inverse map it builds is kept for the backward.
      forced_merge: with ``mosaic_forward``, leave each query's forced blocks (block 0 and its
        two local blocks, Eq. 11) out of the tile kernel and attend them per block of queries
        (:func:`pallas_kernels.gpu.forced_merge.attend_forced`, a Triton kernel of
        ``merge_queries`` queries with the query heads of one KV head a program, ``merge_warps``
        warps, ``merge_stages`` stages), whose partial the XLA merge folds in with the others.
      dq_sum_kernel: sum the dQ parts with a Pallas kernel (one program per query
        and KV head) that skips unlisted parts by a masked load and writes dQ in the
        input dtype, instead of the XLA masked sum to float32 and a cast.
    """

    fwd_warps: int = 2
    fwd_stages: int = 2
    fwd_queries: int = 1
    bwd_warps: int = 8
    bwd_stages: int = 2
    bwd_rows: int = 64
    bwd_rows_major: bool = False
    split_head_dims: bool = True
    bwd_heavy_first: bool = False
    bwd_splits: int = 1
    dq_transposed: bool = False
    dq_sum_kernel: bool = False
    mosaic_backward: bool = False
    mosaic_splits: int = 8
    mosaic_heavy_tiles: int = 0
    mosaic_heavy_splits: int = 0
    mosaic_forward: bool = False
    mosaic_fwd_stages: int = 4
    forced_merge: bool = False
    merge_queries: int = 4
    merge_warps: int = 4
    merge_stages: int = 1

    def __post_init__(self) -> None:
        names = (
            "fwd_warps",
            "fwd_stages",
            "fwd_queries",
            "bwd_warps",
            "bwd_stages",
            "bwd_rows",
            "bwd_splits",
            "mosaic_splits",
            "mosaic_fwd_stages",
            "merge_queries",
            "merge_warps",
            "merge_stages",
        )
        for name in names:
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("bwd_rows", "fwd_queries", "merge_queries"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.mosaic_heavy_tiles < 0:
            raise ValueError(f"mosaic_heavy_tiles must be >= 0, got {self.mosaic_heavy_tiles}")
        if self.mosaic_heavy_tiles and not (
            self.bwd_heavy_first and self.mosaic_heavy_splits > self.mosaic_splits
        ):
            raise ValueError(
                "mosaic_heavy_tiles needs bwd_heavy_first and mosaic_heavy_splits > mosaic_splits, got "
                f"bwd_heavy_first={self.bwd_heavy_first}, mosaic_heavy_splits={self.mosaic_heavy_splits}, "
                f"mosaic_splits={self.mosaic_splits}"
            )


# Keyed by the padded head dims (max(16, next_pow2(Dk)), max(16, next_pow2(Dv))).
# From the H200 sweeps at T=64K, G=16, l'=64, n=16 (experiments/results/selection_sweep*_h200.md):
# - D=128: 4 warps, 3 stages, 32 rows, keys-major (45.9-46.5 ms forward+backward; it spills
#   ~150-230 B per thread yet beats the non-spilling 8-warp layouts, 48.6-65.5 ms); transposed
#   dQ 42.0 ms; key tiles split 4 ways, heaviest first, with the dQ-sum kernel: 44.6 ms on
#   random blocks and 45.0 ms when block 0 is in every selection (spec Eq. 11's forced initial
#   block) where the unsplit kernel takes 111.0 ms (one program walks all T queries of tile 0).
# - Dk=192/Dv=128: 8 warps, 64 rows, rows-major, split head dims: 78.5-79.3 ms; transposed dQ
#   71.5 ms; split 4 ways, heaviest first: 78.5 ms random, 78.2 ms with block 0 (unsplit 163.3).
# The defaults combine transposed dQ with the 4-way split, heaviest first and (D=128) the dQ-sum kernel.
# - D=128 backward tile kernel: Mosaic GPU (``mosaic_backward``) with 8 splits, session 6
#   (experiments/results/selection_h200.md): 39.5 ms forward+backward on random blocks and 39.7
#   with block 0 in every selection, against 41.9 / 42.2 for the Triton kernel in the same runs.
#   With 4 splits (session 5) it lost with block 0 always selected (42.9 ms; inside the NSA op
#   43.7 against 42.1): block 0's tile, split 4 ways, then made the kernel's tail.
# - Dk=192/Dv=128 backward tile kernel: Mosaic GPU with 8 splits and 2 gather slots, session 7,
#   once its dQ went in 64-column pieces (a whole [64, 192] float32 dQ spilled 1128 B a thread):
#   57.0 / 57.2 ms forward+backward on random blocks / with block 0 in every selection, against
#   74.4 / 74.4 for the Triton kernel in the same runs; the XLA dQ-part sum (7.0 ms) beats the
#   dQ-sum kernel (8.5 ms; it loads 256 lanes masked to 192) there: 55.1 / 56.1 ms.
# - Session 11, with the kernel's compute in two warpgroups (experiments/results/
#   selection_sweep_session11*_h200.md): 4 splits a tile, and 8 for the 16 longest lists of a row,
#   34.22 / 34.35 ms forward+backward at D=128 on random blocks / with block 0 in every selection,
#   against 34.96 / 35.21 with 8 splits everywhere and 34.22 / 36.20 with 4 (block 0's tile then
#   makes the tail); Dk=192: 50.87 / 50.61 against 51.42 / 51.56 and 50.59 / 53.73.
_D128_TRITON = SelectionTuning(
    bwd_warps=4,
    bwd_stages=3,
    bwd_rows=32,
    bwd_rows_major=False,
    split_head_dims=False,
    dq_transposed=True,
    bwd_splits=4,
    bwd_heavy_first=True,
    dq_sum_kernel=True,
)
_D192_TRITON = SelectionTuning(
    bwd_warps=8,
    bwd_stages=2,
    bwd_rows=64,
    bwd_rows_major=True,
    dq_transposed=True,
    bwd_splits=4,
    bwd_heavy_first=True,
)
# - Session 25, the forward keys to queries in Mosaic GPU (``mosaic_forward``, 4 query slots), at T=64K
#   on random causal blocks with block 0 in every selection (experiments/results/session25_h200.md),
#   medians of 3 interleaved rounds: Dk=192/Dv=128 forward 15.5 against 18.8 ms, forward+backward
#   43.1 against 47.5; D=128 13.7 against 15.3, 32.1 against 33.5.
_MOSAIC = {
    "mosaic_backward": True,
    "mosaic_splits": 4,
    "mosaic_heavy_tiles": 16,
    "mosaic_heavy_splits": 8,
    "mosaic_forward": True,
}
# - Session 14, the forward over two positions a program (``fwd_queries=2``, blocks both select read
#   once): at T=64K on the op's own selections, Dk=192/Dv=128 18.9 / 18.8 ms against 19.8 / 19.6
#   (forward+backward 47.0 / 47.0 against 48.3 / 48.2); D=128 15.8 / 15.8 against 15.7 / 15.6, so
#   it stays at one there; four positions were slower at both (19.4-21.5 / 22.0-24.6 ms;
#   experiments/results/layer_session14_h200.md).
_TUNING_BY_HEAD_DIMS: dict[tuple[int, int], SelectionTuning] = {
    (128, 128): dataclasses.replace(_D128_TRITON, **_MOSAIC),
    (256, 128): dataclasses.replace(_D192_TRITON, fwd_queries=2, **_MOSAIC),
}
# Other head dims take the D=128 Triton tuning (smaller ones need fewer registers; larger ones are
# untuned; the Mosaic kernel was measured at D=128 and Dk=192/Dv=128 only).
DEFAULT_TUNING = _D128_TRITON


def tuning_for(dk: int, dv: int) -> SelectionTuning:
    """Launch parameters for head dims ``dk``/``dv``: the table entry, else :data:`DEFAULT_TUNING`."""
    key = (max(16, pl.next_power_of_2(dk)), max(16, pl.next_power_of_2(dv)))
    return _TUNING_BY_HEAD_DIMS.get(key, DEFAULT_TUNING)
