"""Sliding-window and compressed attention as Pallas TPU kernels.

Both are the ``"range"`` mode of :mod:`pallas_kernels.tpu.core`: query tile ``i``
reads a contiguous range of key tiles (known from the shapes alone) and the mask is
``a_key >= lo_row and e_key <= t_row``:

- window: ``a = e = p`` (key position), ``lo = max(s0, t - w + 1)``;
- compression: ``a``/``e`` = first/last raw position of the compressed token in the
  slot (:func:`nsa_jax.segments.compressed_token_starts`), ``lo = s0``.

Why not splash attention: ``jax.experimental.pallas.ops.tpu.splash_attention``
expresses the window (``LocalMask``) and packed sequences (``SegmentIds``), but its
masks are static per (query, key) position, so the compression branch's
data-dependent, segment-relative slot layout does not fit; and the compression
branch needs the log-sum-exp with ``-inf`` and an output of exactly 0 for a query
that sees nothing (splash's fully-masked rows are not defined to give that). One
small kernel family serves all three NSA branches instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.segments import compressed_token_starts, segment_starts
from pallas_kernels.tpu import core, layout
from pallas_kernels.tpu.block_sizes import SUBLANES, TpuBlockSizes, block_sizes_for, round_up


def check(q, *_, **__) -> None:
    """Raises ``ValueError`` for arguments the TPU kernels do not serve (only float16)."""
    layout.check_dtype(q)


def range_lists(lo: np.ndarray, hi: np.ndarray, batch: int, heads: int) -> tuple[jax.Array, jax.Array]:
    """Key-tile lists ``lo[i] .. hi[i]`` per query tile (empty where ``hi < lo``).

    Returns:
      ``(tiles [B, H, nQ, U], counts [B, H, nQ])`` with ``U = max(1, max count)``.
    """
    counts = np.maximum(hi - lo + 1, 0).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    steps = np.arange(width)[None, :]
    tiles = np.where(
        counts[:, None] > 0, lo[:, None] + np.minimum(steps, np.maximum(counts[:, None] - 1, 0)), 0
    )
    tiles = np.broadcast_to(tiles.astype(np.int32), (batch, heads, *tiles.shape))
    return jnp.asarray(tiles), jnp.asarray(np.broadcast_to(counts, (batch, heads, counts.shape[0])))


def _geometry(q, kv_heads, dk, dv, num_keys, block_sizes):
    _, length, q_heads, _ = q.shape
    group = q_heads // kv_heads
    sizes = block_sizes or block_sizes_for(dk, dv, q.dtype)
    key_tile = min(sizes.key_tile, round_up(num_keys, SUBLANES))
    num_key_tiles = -(-num_keys // key_tile)
    per_tile = layout.queries_per_tile(group, length, sizes.query_rows)
    num_q = -(-length // per_tile)
    last_query = np.minimum((np.arange(num_q) + 1) * per_tile, length) - 1
    return sizes, group, key_tile, num_key_tiles, per_tile, num_q, last_query


def _run(
    q, k, v, row_info, key_info, tiles, counts, *, scale, sizes, per_tile, group, key_tile, num_q, interpret
):
    _, length, q_heads, _ = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    cfg = core.Config(
        mode="range",
        scale=float(scale),
        rows=per_tile * group,
        key_tile=key_tile,
        width=tiles.shape[-1],
        smem_words=sizes.smem_words,
        interpret=core.interpret_params(interpret),
    )
    num_keys = key_info.shape[-1]
    out, lse = core.attend(
        layout.to_rows(q, kv_heads, num_q * per_tile),
        layout.to_keys(k, num_keys),
        layout.to_keys(v, num_keys),
        row_info,
        key_info,
        tiles,
        counts,
        cfg,
    )
    lse = layout.from_rows(lse, length, q_heads, 1)[..., 0]
    return layout.from_rows(out, length, q_heads, dv), lse


def _pad_keys(a: jax.Array, e: jax.Array, num_keys: int) -> jax.Array:
    key_info = jnp.stack([a, e], axis=1).astype(jnp.int32)
    return jnp.pad(key_info, [(0, 0), (0, 0), (0, num_keys - a.shape[1])], constant_values=core.NEVER)


@functools.partial(jax.jit, static_argnames=("window", "scale", "interpret", "block_sizes"))
def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float,
    segment_ids: jax.Array | None = None,
    interpret=False,
    block_sizes: TpuBlockSizes | None = None,
) -> jax.Array:
    """Window attention on TPU; arguments as :func:`nsa_jax.sliding_window_attention`."""
    layout.check_dtype(q)
    batch, length, _, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    sizes, group, key_tile, num_key_tiles, per_tile, num_q, last_query = _geometry(
        q, kv_heads, dk, dv, length, block_sizes
    )
    first_query = np.arange(num_q) * per_tile
    lo = np.maximum(first_query - window + 1, 0) // key_tile
    tiles, counts = range_lists(lo, last_query // key_tile, batch, kv_heads)

    positions = jnp.arange(length, dtype=jnp.int32)
    starts = segment_starts(segment_ids, batch, length)
    low = jnp.maximum(starts, positions[None, :] - window + 1)
    info = jnp.stack([low, jnp.broadcast_to(positions, (batch, length))], axis=-1)[:, None]
    row_info = layout.rows_info(info, num_q * per_tile, group, (core.NEVER, -1))
    key_pos = jnp.broadcast_to(positions, (batch, length))
    key_info = _pad_keys(key_pos, key_pos, num_key_tiles * key_tile)
    out, _ = _run(
        q, k, v, row_info, key_info, tiles, counts,
        scale=scale, sizes=sizes, per_tile=per_tile, group=group, key_tile=key_tile, num_q=num_q,
        interpret=interpret,
    )  # fmt: skip
    return out


@functools.partial(
    jax.jit, static_argnames=("block_length", "scale", "interpret", "block_sizes", "block_stride")
)
def compressed_attention(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    scale: float,
    segment_ids: jax.Array | None = None,
    interpret=False,
    block_sizes: TpuBlockSizes | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Compressed attention on TPU; arguments and results as :func:`nsa_jax.compressed_attention`."""
    layout.check_dtype(q)
    batch, length, q_heads, dk = q.shape
    num_tokens, kv_heads, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    if num_tokens == 0:
        empty_lse = jnp.full((batch, length, q_heads), -jnp.inf, jnp.float32)
        return jnp.zeros((batch, length, q_heads, dv), q.dtype), empty_lse
    sizes, group, key_tile, num_key_tiles, per_tile, num_q, last_query = _geometry(
        q, kv_heads, dk, dv, num_tokens, block_sizes
    )
    # Slot s holds a token starting at a >= s*d - (d - 1); visible needs a + l - 1 <= t,
    # so query tile i can see slots up to (t_max - l + d) // d.
    reach = last_query - block_length + block_stride
    last_slot = np.where(reach >= 0, np.minimum(reach // block_stride, num_tokens - 1), -1)
    hi = np.where(last_slot >= 0, last_slot // key_tile, -1)
    tiles, counts = range_lists(np.zeros_like(hi), hi, batch, kv_heads)

    positions = jnp.arange(length, dtype=jnp.int32)
    starts = segment_starts(segment_ids, batch, length)
    info = jnp.stack([starts, jnp.broadcast_to(positions, (batch, length))], axis=-1)[:, None]
    row_info = layout.rows_info(info, num_q * per_tile, group, (core.NEVER, -1))
    token_starts = compressed_token_starts(
        starts, num_tokens, block_length=block_length, block_stride=block_stride
    )
    valid = token_starts >= 0
    key_info = _pad_keys(
        jnp.where(valid, token_starts, core.NEVER),
        jnp.where(valid, token_starts + block_length - 1, core.NEVER),
        num_key_tiles * key_tile,
    )
    return _run(
        q, k_cmp, v_cmp, row_info, key_info, tiles, counts,
        scale=scale, sizes=sizes, per_tile=per_tile, group=group, key_tile=key_tile, num_q=num_q,
        interpret=interpret,
    )  # fmt: skip
