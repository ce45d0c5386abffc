"""Pieces shared by the pure-JAX reference branches: chunking and masked softmax."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# The references are the yardstick for kernels: float32 matmuls at full precision
# (no TF32 on GPU).
PRECISION = jax.lax.Precision.HIGHEST


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for half-precision inputs, the input dtype when it is wider."""
    return jnp.promote_types(dtype, jnp.float32)


# Queries per chunk in the reference branches. 1024 keeps the gathered keys of the
# selection branch at 64K tokens (paper config, bf16) near 1 GB per chunk.
QUERY_CHUNK_SIZE = 1024


def map_query_chunks(
    fn: Callable[..., tuple[jax.Array, ...]],
    per_query: tuple[jax.Array, ...],
    *,
    chunk_size: int = QUERY_CHUNK_SIZE,
) -> tuple[jax.Array, ...]:
    """Applies ``fn`` to consecutive chunks of queries, one at a time.

    Args:
      fn: ``fn(chunk_start, positions [1, C], *chunks) -> tuple of [B, C, ...]``; each
        chunk is the slice ``[:, chunk_start : chunk_start + C]`` of one array.
      per_query: arrays ``[B, T, ...]``; the tail chunk is padded by repetition of
        the last query and its outputs dropped.

    Returns:
      ``fn``'s outputs for all ``T`` queries, ``[B, T, ...]`` each.

    The body is rematerialised in the backward pass so that memory stays one chunk
    deep instead of growing with ``T``.
    """
    length = per_query[0].shape[1]
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    padded = num_chunks * chunk

    def pad(x: jax.Array) -> jax.Array:
        if padded == length:
            return x
        return jnp.concatenate([x, jnp.repeat(x[:, -1:], padded - length, axis=1)], axis=1)

    chunked = [pad(x) for x in per_query]
    body = jax.checkpoint(fn)

    def step(index: jax.Array) -> tuple[jax.Array, ...]:
        start = index * chunk
        positions = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        chunks = [jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in chunked]
        return body(start, positions, *chunks)

    if num_chunks == 1:
        outs = step(jnp.int32(0))
        return tuple(out[:, :length] for out in outs)
    outs = jax.lax.map(step, jnp.arange(num_chunks, dtype=jnp.int32))
    return tuple(
        jnp.moveaxis(out, 0, 1).reshape(out.shape[1], padded, *out.shape[3:])[:, :length] for out in outs
    )


def masked_softmax(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last axis restricted to ``mask``.

    Rows with nothing visible get all-zero probabilities and log-sum-exp ``-inf``
    (spec: a branch with nothing visible contributes 0, not NaN).

    Returns:
      ``(probs, lse)``: ``logits.shape`` and ``logits.shape[:-1]``, at least float32.
    """
    logits = jnp.where(mask, logits.astype(accumulation_dtype(logits.dtype)), -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    nonempty = total > 0
    safe_total = jnp.where(nonempty, total, 1.0)
    lse = jnp.where(nonempty, row_max + jnp.log(safe_total), -jnp.inf)[..., 0]
    return weights / safe_total, lse
