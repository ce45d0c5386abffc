"""Launch parameters of the selected-attention kernels (Triton lowering)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SelectionTuning:
    """Warps, software-pipelining depth and row batching of the selected-attention kernels.

    The forward holds the ``G`` query heads of one query position (rows padded to
    ``max(16, next_pow2(G))``) against one selected key block (padded to
    ``max(16, next_pow2(block_size))``); head dims are padded to powers of two by
    masked loads.

    Attributes:
      fwd_warps, fwd_stages: forward kernel (one program per query and KV head).
      bwd_warps, bwd_stages: backward kernel (one program per key tile and KV head).
      bwd_rows: query rows gathered per backward step, a power of two:
        ``bwd_rows / next_pow2(G)`` (query, slot) pairs of the tile's inverse-map
        list at once (at least one pair, at least 16 rows).
    """

    fwd_warps: int = 2
    fwd_stages: int = 2
    bwd_warps: int = 4
    bwd_stages: int = 3
    bwd_rows: int = 32

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.bwd_rows & (self.bwd_rows - 1):
            raise ValueError(f"bwd_rows must be a power of two, got {self.bwd_rows}")


# Best of the sweep in experiments/bench_selection.py on one H200 (jax 0.11.2, bf16,
# T=64K, G=16, D=128): see experiments/results/selection_h200.md.
DEFAULT_TUNING = SelectionTuning()
