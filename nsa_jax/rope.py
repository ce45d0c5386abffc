"""Rotary position embedding (RoPE), half-split convention."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
    """Rotates pairs ``(x[..., i], x[..., i + D/2])`` by ``position * theta^(-2i/D)``.

    Args:
      x: ``[B, T, N, D]`` with even ``D``.
      positions: int ``[B, T]``.

    Returns:
      ``[B, T, N, D]`` in ``x.dtype``; the rotation is computed in at least float32.
    """
    half = x.shape[-1] // 2
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = theta ** (-jnp.arange(half, dtype=dtype) / half)
    angles = positions.astype(dtype)[:, :, None, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second = jnp.split(x.astype(dtype), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
