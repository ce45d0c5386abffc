"""Compressed-token attention (spec, "Compression branch (Eqs. 7-8)")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.reference.common import PRECISION, accumulation_dtype, map_query_chunks, masked_softmax
from nsa_jax.segments import compressed_token_starts, segment_starts


def compressed_visibility(
    positions: jax.Array, query_starts: jax.Array, token_starts: jax.Array, block_length: int
) -> jax.Array:
    """Which compressed tokens each query sees.

    A compressed token is visible to query ``t`` once its whole block has ended
    (``start + l - 1 <= t``) and it lies in ``t``'s segment (``start >= s0(t)``).

    Args:
      positions: int32 ``[B, C]`` (or ``[1, C]``) query positions.
      query_starts: int32 ``[B, C]`` segment start of each query.
      token_starts: int32 ``[B, Tc]``, ``-1`` for empty slots.

    Returns:
      bool ``[B, C, Tc]``.
    """
    ends = token_starts + block_length - 1
    return (token_starts[:, None, :] >= query_starts[:, :, None]) & (
        ends[:, None, :] <= positions[:, :, None]
    )


def compressed_logits(q_chunk: jax.Array, k_cmp: jax.Array, scale: float) -> jax.Array:
    """float32 ``[B, C, H, G, Tc]`` scores of a query chunk ``[B, C, HQ, Dk]``."""
    batch, chunk, q_heads, _ = q_chunk.shape
    kv_heads = k_cmp.shape[2]
    queries = q_chunk.reshape(batch, chunk, kv_heads, q_heads // kv_heads, -1)
    return (
        jnp.einsum(
            "bchgd,bshd->bchgs",
            queries,
            k_cmp,
            preferred_element_type=accumulation_dtype(q_chunk.dtype),
            precision=PRECISION,
        )
        * scale
    )


def attend_compressed(
    q: jax.Array,
    positions: jax.Array,
    query_starts: jax.Array,
    token_starts: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    *,
    block_length: int,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Compressed attention of a chunk of queries.

    Args:
      q: ``[B, C, HQ, Dk]``; positions: int32 ``[B, C]`` (or ``[1, C]``);
      query_starts: int32 ``[B, C]``; token_starts: int32 ``[B, Tc]``;
      k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]``.

    Returns:
      ``(out [B, C, HQ, Dv]`` in ``q.dtype``, ``lse [B, C, HQ])``.
    """
    batch, chunk, q_heads, _ = q.shape
    logits = compressed_logits(q, k_cmp, scale)
    visible = compressed_visibility(positions, query_starts, token_starts, block_length)
    probs, lse = masked_softmax(logits, visible[:, :, None, None, :])
    out = jnp.einsum("bchgs,bshd->bchgd", probs, v_cmp.astype(probs.dtype), precision=PRECISION)
    return out.reshape(batch, chunk, q_heads, -1).astype(q.dtype), lse.reshape(batch, chunk, q_heads)


def compressed_attention(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Reference compressed attention; arguments as :func:`nsa_jax.compressed_attention`."""
    batch, length = q.shape[:2]
    starts = segment_starts(segment_ids, batch, length)
    token_starts = compressed_token_starts(
        starts, k_cmp.shape[1], block_length=block_length, block_stride=block_stride
    )

    def chunk_fn(_, positions, q_chunk, start_chunk):
        return attend_compressed(
            q_chunk,
            positions,
            start_chunk,
            token_starts,
            k_cmp,
            v_cmp,
            block_length=block_length,
            scale=scale,
        )

    out, lse = map_query_chunks(chunk_fn, (q, starts))
    return out, lse


def compression_probabilities(
    q_chunk: jax.Array,
    lse_chunk: jax.Array,
    positions: jax.Array,
    query_starts: jax.Array,
    token_starts: jax.Array,
    k_cmp: jax.Array,
    *,
    block_length: int,
    scale: float,
) -> jax.Array:
    """``p_cmp`` of a query chunk, recomputed from the saved log-sum-exp.

    Args:
      q_chunk: ``[B, C, HQ, Dk]``; lse_chunk: float32 ``[B, C, HQ]``.

    Returns:
      float32 ``[B, C, HQ, Tc]``, zero where a token is not visible.
    """
    batch, chunk, q_heads, _ = q_chunk.shape
    logits = compressed_logits(q_chunk, k_cmp, scale).reshape(batch, chunk, q_heads, -1)
    visible = compressed_visibility(positions, query_starts, token_starts, block_length)
    probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse_chunk), lse_chunk, 0.0)[..., None])
    return jnp.where(visible[:, :, None, :], probs, 0.0)
