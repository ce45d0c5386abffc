"""Inputs shared by the selected-attention GPU check and benchmark."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nsa_jax.segments import segment_starts
from pallas_kernels.gpu.block_sizes import SelectionTuning, tuning_for

# Backward variants swept at 64K (name: tuning); the first of each config is the default
# (tuning_for) and the reference of the sweep's gradient check. Results of the H200 sweeps:
# experiments/results/selection_sweep*_h200.md (losers of earlier sweeps are dropped: 8-warp
# keys-major at D=128, atomic dQ, packed sort, 4-warp rows-major). ptxas registers/spills
# (sm_90a, G=16, l'=64) are in experiments/results/selection_h200.md.
_D128 = SelectionTuning(bwd_warps=4, bwd_stages=3, bwd_rows=32, bwd_rows_major=False, split_head_dims=False)
_D192 = SelectionTuning(bwd_warps=8, bwd_stages=2, bwd_rows=64, bwd_rows_major=True)
_HEAVY_SUM = {"bwd_heavy_first": True, "dq_sum_kernel": True}


def _splits(light: int, heavy_tiles: int = 0, heavy: int = 0) -> dict:
    """Mosaic tile-kernel programs: ``light`` a key tile, ``heavy`` for the ``heavy_tiles`` longest lists."""
    return {"mosaic_splits": light, "mosaic_heavy_tiles": heavy_tiles, "mosaic_heavy_splits": heavy}


_8W_128R_ROWS = SelectionTuning(bwd_warps=8, bwd_stages=2, bwd_rows=128, bwd_rows_major=True)


# The defaults are the Mosaic GPU tile kernel (D=128 since session 6, Dk=192 since session 7) with
# 4 splits a key tile and 8 for the 16 longest lists (session 11; 8 everywhere before);
# ``triton`` is the Triton tile kernel of the sessions before (4 splits). Block 0's tile holds every
# query when block 0 is forced (--first-block): the split count decides how long its programs' chain is.
_D128_DEFAULT = tuning_for(128, 128)
_D128_TRITON = dataclasses.replace(_D128_DEFAULT, mosaic_backward=False)
_D192_DEFAULT = tuning_for(192, 128)


def _forward_variants(default: SelectionTuning) -> dict[str, SelectionTuning]:
    """The Triton forward (the default before session 25), the Mosaic forward's ring depths and the
    forced blocks attended outside its tile kernel (:mod:`pallas_kernels.gpu.forced_merge`) at a few
    launches."""
    stages = {f"keys_forward_s{n}": dataclasses.replace(default, mosaic_fwd_stages=n) for n in (2, 6, 8)}
    merges = {
        "forced_merge": {"forced_merge": True},
        "forced_merge_s2": {"forced_merge": True, "merge_stages": 2},
        "forced_merge_q8_w8": {"forced_merge": True, "merge_queries": 8, "merge_warps": 8, "merge_stages": 2},
        "forced_merge_q16_w8": {
            "forced_merge": True,
            "merge_queries": 16,
            "merge_warps": 8,
            "merge_stages": 2,
        },
    }
    merges = {name: dataclasses.replace(default, **fields) for name, fields in merges.items()}
    return {"triton_forward": dataclasses.replace(default, mosaic_forward=False), **stages, **merges}


VARIANTS = {
    "G16_D128": {
        "default": _D128_DEFAULT,
        "fwd_two_positions": dataclasses.replace(_D128_DEFAULT, fwd_queries=2),  # tied at 64K (session 14)
        **_forward_variants(_D128_DEFAULT),
        "triton": _D128_TRITON,
        "triton_split8": dataclasses.replace(_D128_TRITON, bwd_splits=8),
        "mosaic_split4": dataclasses.replace(_D128_DEFAULT, **_splits(4)),
        "mosaic_split6": dataclasses.replace(_D128_DEFAULT, **_splits(6)),
        "mosaic_split8": dataclasses.replace(_D128_DEFAULT, **_splits(8)),
        "mosaic_split12": dataclasses.replace(_D128_DEFAULT, **_splits(12)),
        "mosaic_split16": dataclasses.replace(_D128_DEFAULT, **_splits(16)),
        "mosaic_split4_heavy1x16": dataclasses.replace(_D128_DEFAULT, **_splits(4, 1, 16)),
        "mosaic_split4_heavy4x16": dataclasses.replace(_D128_DEFAULT, **_splits(4, 4, 16)),
        "mosaic_split4_heavy64x8": dataclasses.replace(_D128_DEFAULT, **_splits(4, 64, 8)),
        "mosaic_s4": dataclasses.replace(_D128_DEFAULT, bwd_stages=4),
        "4w_32r_keys_dqT": dataclasses.replace(_D128, dq_transposed=True),
        "4w_32r_keys_heavy_sumk_split4": dataclasses.replace(_D128, bwd_splits=4, **_HEAVY_SUM),
        "4w_32r_keys": _D128,
        "4w_32r_keys_heavy_sumk": dataclasses.replace(_D128, **_HEAVY_SUM),
        "8w_128r_rows_dqT_heavy_sumk": dataclasses.replace(_8W_128R_ROWS, dq_transposed=True, **_HEAVY_SUM),
        "8w_128r_rows": _8W_128R_ROWS,
    },
    "G16_D192_128": {
        "default": _D192_DEFAULT,
        "fwd_one_position": dataclasses.replace(_D192_DEFAULT, fwd_queries=1),  # default before session 14
        **_forward_variants(_D192_DEFAULT),
        "triton": dataclasses.replace(_D192_DEFAULT, mosaic_backward=False),
        "mosaic_s3": dataclasses.replace(_D192_DEFAULT, bwd_stages=3),
        "mosaic_split4": dataclasses.replace(_D192_DEFAULT, **_splits(4)),
        "mosaic_split8": dataclasses.replace(_D192_DEFAULT, **_splits(8)),
        "mosaic_split4_heavy4x16": dataclasses.replace(_D192_DEFAULT, **_splits(4, 4, 16)),
        "dq_sum_kernel": dataclasses.replace(_D192_DEFAULT, dq_sum_kernel=True),
        "8w_64r_rows_dqT": dataclasses.replace(_D192, dq_transposed=True),
        "8w_64r_rows_heavy_sumk_split4": dataclasses.replace(_D192, bwd_splits=4, **_HEAVY_SUM),
        "8w_64r_rows": _D192,
        "8w_64r_rows_heavy_sumk": dataclasses.replace(_D192, **_HEAVY_SUM),
        "8w_64r_keys_dqT": dataclasses.replace(_D192, bwd_rows_major=False, dq_transposed=True),
    },
}


def unknown_variants(names: list[str]) -> list[str]:
    """Those of ``names`` that are not a :data:`VARIANTS` entry of every head-dim config."""
    return [name for name in names if not all(name in config for config in VARIANTS.values())]


def random_causal_indices(
    key: jax.Array,
    batch: int,
    length: int,
    kv_heads: int,
    slots: int,
    block_size: int,
    segment_ids: jax.Array | None = None,
    first_block: bool = False,
    previous_block: bool = False,
) -> jax.Array:
    """Random distinct visible blocks per (query, KV head), the query's own block included.

    Block ``j`` is visible to query ``t`` when ``s0 + j * block_size <= t``. Each row
    holds the own block plus ``slots - 1`` distinct random earlier blocks, sorted
    ascending, ``-1`` last when fewer blocks are visible. With ``first_block`` the
    earlier blocks always include block 0, as the spec's top-n does (Eq. 11: the
    initial block is always selected), so that one key tile is read by every query;
    with ``previous_block`` they include the block before the own one (Eq. 11's second
    local block), so that every query has the spec's three forced blocks.

    Returns:
      int32 ``[B, T, H, n]``.
    """
    num_blocks = -(-length // block_size)
    s0 = segment_starts(segment_ids, batch, length)
    own = (jnp.arange(length, dtype=jnp.int32)[None, :] - s0) // block_size  # [B, T]
    scores = jax.random.uniform(key, (batch, length, kv_heads, num_blocks))
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    if first_block:  # above every uniform score, so top_k keeps it wherever it is earlier
        scores = jnp.where(blocks == 0, 2.0, scores)
    earlier = blocks[None, None, None, :] < own[:, :, None, None]
    if previous_block:
        scores = jnp.where(blocks[None, None, None, :] == own[:, :, None, None] - 1, 2.0, scores)
    scores = jnp.where(earlier, scores, -1.0)
    top, picked = jax.lax.top_k(scores, min(slots - 1, num_blocks))
    picked = jnp.where(top >= 0, picked, -1).astype(jnp.int32)
    if picked.shape[-1] < slots - 1:
        padding = jnp.full((*picked.shape[:-1], slots - 1 - picked.shape[-1]), -1, jnp.int32)
        picked = jnp.concatenate([picked, padding], axis=-1)
    own = jnp.broadcast_to(own[:, :, None, None], (batch, length, kv_heads, 1))
    chosen = jnp.concatenate([picked, own], axis=-1)
    ordered = jnp.sort(jnp.where(chosen < 0, num_blocks, chosen), axis=-1)
    return jnp.where(ordered == num_blocks, -1, ordered)


def packed_segments(batch: int, length: int, cuts: tuple[int, ...]) -> jax.Array:
    """int32 ``[B, T]`` segment ids that change at each position in ``cuts``."""
    positions = jnp.arange(length)
    ids = jnp.sum(positions[:, None] >= jnp.asarray(cuts)[None, :], axis=1).astype(jnp.int32)
    return jnp.broadcast_to(ids, (batch, length))
