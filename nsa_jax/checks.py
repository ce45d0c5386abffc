"""Argument checks shared by every op: each error names the argument and the rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def rank(name: str, x: jax.Array, expected: int, layout: str) -> None:
    if not hasattr(x, "ndim"):
        raise TypeError(f"{name} must be an array {layout}, got {type(x).__name__}")
    if x.ndim != expected:
        raise ValueError(f"{name} must have rank {expected} {layout}, got shape {tuple(x.shape)}")


def floating_same_dtype(**arrays: jax.Array) -> None:
    """All arrays are float16/bfloat16/float32/float64 and share one dtype."""
    dtypes = {name: jnp.dtype(x.dtype) for name, x in arrays.items()}
    for name, dtype in dtypes.items():
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {dtype}")
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"{', '.join(dtypes)} must share one dtype, got {listed}")


def integer_array(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")


def same_dim(what: str, **dims: int) -> int:
    values = set(dims.values())
    if len(values) != 1:
        listed = ", ".join(f"{n}={v}" for n, v in dims.items())
        raise ValueError(f"{what} must agree: {listed}")
    return values.pop()


def query_key_heads(q_heads: int, kv_heads: int) -> int:
    """Returns the group size G = HQ / H."""
    if q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of the key/value heads ({kv_heads})")
    return q_heads // kv_heads


def segment_ids(x: jax.Array | None, batch: int, length: int) -> None:
    if x is None:
        return
    rank("segment_ids", x, 2, "[B, T]")
    integer_array("segment_ids", x)
    if tuple(x.shape) != (batch, length):
        raise ValueError(f"segment_ids must have shape (B, T) = {(batch, length)}, got {tuple(x.shape)}")


def is_concrete(x: jax.Array) -> bool:
    """Whether the values of ``x`` are known now (not traced under jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def scale(value: float | None, head_dim: int) -> float:
    if value is None:
        return float(head_dim) ** -0.5
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a positive finite number, got {value!r}")
    return float(value)
