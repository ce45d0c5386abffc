"""Between the op layouts ``[B, T, heads, D]`` and the kernel layouts of :mod:`core`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.tpu.block_sizes import LANES, SUBLANES, round_up

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_dtype(q: jax.Array) -> None:
    """Raises ``ValueError`` for dtypes the TPU kernels do not serve."""
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"q must be float32 or bfloat16 for pallas_tpu, got {jnp.dtype(q.dtype).name}")


def queries_per_tile(group: int, length: int, query_rows: int) -> int:
    """``P``: query positions per tile, so that ``P * G`` is a multiple of 8 near ``query_rows``."""
    step = SUBLANES // math.gcd(group, SUBLANES)
    per_tile = round_up(max(1, query_rows // group), step)
    return min(per_tile, round_up(length, step))


def to_rows(x: jax.Array, kv_heads: int, padded_length: int) -> jax.Array:
    """``[B, T, HQ, D]`` to ``[B, H, Tp * G, D']``: row ``t * G + g`` is head ``h * G + g``."""
    batch, length, q_heads, dim = x.shape
    group = q_heads // kv_heads
    x = jnp.pad(x, [(0, 0), (0, padded_length - length), (0, 0), (0, round_up(dim, LANES) - dim)])
    x = x.reshape(batch, padded_length, kv_heads, group, -1).transpose(0, 2, 1, 3, 4)
    return x.reshape(batch, kv_heads, padded_length * group, -1)


def from_rows(x: jax.Array, length: int, q_heads: int, dim: int) -> jax.Array:
    """Inverse of :func:`to_rows`: ``[B, H, Tp * G, D']`` to ``[B, T, HQ, D]``."""
    batch, kv_heads, rows, _ = x.shape
    group = q_heads // kv_heads
    x = x.reshape(batch, kv_heads, rows // group, group, -1).transpose(0, 2, 1, 3, 4)
    return x.reshape(batch, rows // group, q_heads, -1)[:, :length, :, :dim]


def to_keys(x: jax.Array, padded_length: int) -> jax.Array:
    """``[B, T, H, D]`` to ``[B, H, Tk, D']`` (zero padding)."""
    _, length, _, dim = x.shape
    x = jnp.pad(x, [(0, 0), (0, padded_length - length), (0, 0), (0, round_up(dim, LANES) - dim)])
    return x.transpose(0, 2, 1, 3)


def rows_info(info: jax.Array, padded_length: int, group: int, pad_row: tuple[int, ...]) -> jax.Array:
    """Per-query int32 ``[B, Hr, T, C]`` to per-row ``[B, Hr, Tp * G, C]``; padded queries get ``pad_row``."""
    batch, heads, length, cols = info.shape
    pad = jnp.broadcast_to(jnp.asarray(pad_row, jnp.int32), (batch, heads, padded_length - length, cols))
    info = jnp.concatenate([info.astype(jnp.int32), pad], axis=2)
    return jnp.repeat(info, group, axis=2)
