"""Tile sizes of the Pallas TPU kernels, as data.

A TPU vector register is ``8 x 128`` (sublanes x lanes) and the MXU multiplies
``128 x 128`` tiles, so every tile here is a multiple of 8 rows and head dims are
padded to multiples of 128 lanes by the wrappers.

``query_rows`` counts rows of the query tile, i.e. ``queries_per_tile * G``: all ``G``
query heads of a KV head share one tile (spec, "Kernel design": group-centric
loading), and several query positions are packed into it so that small ``G`` still
fills the MXU. ``key_tile`` is the key tile of the window and compression kernels;
the selection kernel uses the selection block size (rounded up to 8) instead.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

LANES = 128
SUBLANES = 8

# Scalar-prefetch budget (int32 words) of one pallas_call. SMEM is 1 MiB per core on
# TPU v4 and later (16 KiB on v2/v3; jax._src.tpu_info), shared with the kernel's
# own scalars, so the tile lists (1-D, no tile padding) are chunked along the query
# axis (forward, dQ) or the entry axis (dK/dV) into several pallas_calls of at most
# this many words: 256 KiB by default.
DEFAULT_SMEM_WORDS = 64 * 1024


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Tile sizes for one (head dims, dtype) class.

    Attributes:
      query_rows: target rows (query positions times ``G``) of a query tile.
      key_tile: keys per tile in the window / compression kernels (a lane multiple).
      smem_words: scalar-prefetch budget per pallas_call, in int32 words.
    """

    query_rows: int = 128
    key_tile: int = 128
    smem_words: int = DEFAULT_SMEM_WORDS

    def __post_init__(self):
        if self.query_rows % SUBLANES or self.query_rows <= 0:
            raise ValueError(f"query_rows must be a positive multiple of {SUBLANES}, got {self.query_rows}")
        if self.key_tile % SUBLANES or self.key_tile <= 0:
            raise ValueError(f"key_tile must be a positive multiple of {SUBLANES}, got {self.key_tile}")
        if self.smem_words < 4:
            raise ValueError(f"smem_words must be at least 4, got {self.smem_words}")


DEFAULT = TpuBlockSizes()

# Keyed by (padded Dk, padded Dv, dtype name). Larger head dims take fewer query
# rows so that q, dO, the f32 accumulators and two buffered K/V tiles stay well
# inside the default scoped VMEM limit (16 MiB on v5e, 32 MiB on v6e).
TABLE: dict[tuple[int, int, str], TpuBlockSizes] = {
    (128, 128, "bfloat16"): TpuBlockSizes(query_rows=256, key_tile=256),
    (128, 128, "float32"): TpuBlockSizes(query_rows=128, key_tile=128),
    (256, 128, "bfloat16"): TpuBlockSizes(query_rows=128, key_tile=256),  # Dk=192, Dv=128 (paper)
    (256, 128, "float32"): TpuBlockSizes(query_rows=128, key_tile=128),
    (256, 256, "bfloat16"): TpuBlockSizes(query_rows=128, key_tile=128),
    (256, 256, "float32"): TpuBlockSizes(query_rows=64, key_tile=128),
}


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def block_sizes_for(dk: int, dv: int, dtype) -> TpuBlockSizes:
    """Table entry for head dims ``dk``/``dv`` (padded to 128 lanes) and ``dtype``."""
    key = (round_up(dk, LANES), round_up(dv, LANES), jnp.dtype(dtype).name)
    return TABLE.get(key, DEFAULT)
