"""Sliding-window attention on NVIDIA GPUs through cuDNN's fused attention (spec, "Sliding window").

Registered as implementation ``"cudnn"`` of ``sliding_window_attention``. It calls
``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True,
local_window_size=(w - 1, 0))``: jax hands cuDNN a left window of ``w`` with an
exclusive bound, ``(t - w, t]``, which is the spec's ``t - w + 1 .. t``. cuDNN reads
K/V with fewer heads than q directly (query head ``hq`` uses KV head ``hq // G``, as
the spec). It serves what that call serves: float16/bfloat16, no packed segments,
head dims up to 256 (128 before Hopper).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# jax's wrapper requires one head dim for q, k and v, and cuDNN a multiple of 8; the
# smaller of Dk / Dv is zero-padded up to it. Zero query/key lanes add nothing to a
# logit and zero value lanes produce output lanes that are dropped, so the result and
# its gradients are exact.
_LANE_MULTIPLE = 8


def _head_dim(q: jax.Array, v: jax.Array) -> int:
    widest = max(q.shape[-1], v.shape[-1])
    return -(-widest // _LANE_MULTIPLE) * _LANE_MULTIPLE


def _max_head_dim() -> int:
    """cuDNN's flash attention takes head dims up to 256 on Hopper and newer, 128 before."""
    if jax.default_backend() != "gpu":
        return 128
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if tuple(int(x) for x in capability.split(".")) >= (9, 0) else 128


def check(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> None:
    """Raises ``ValueError`` for arguments cuDNN's fused attention cannot serve here."""
    del k, window, scale
    if segment_ids is not None:
        raise ValueError("segment_ids must be None for the cudnn window: jax's cuDNN call has no segments")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"q must be float16 or bfloat16 for the cudnn window, got {q.dtype}")
    limit = _max_head_dim()
    if _head_dim(q, v) > limit:
        raise ValueError(
            f"head dims Dk={q.shape[-1]}, Dv={v.shape[-1]} must be at most {limit} for the cudnn window"
        )


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """cuDNN window attention; arguments as :func:`nsa_jax.sliding_window_attention`.

    Args:
      q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``, float16/bfloat16.
      window: ``w``; query ``t`` sees keys ``max(0, t - w + 1) .. t``.
      scale: logit scale.
      segment_ids: must be ``None`` (see :func:`check`).

    Returns:
      ``[B, T, HQ, Dv]`` in ``q.dtype``.
    """
    check(q, k, v, window=window, scale=scale, segment_ids=segment_ids)
    width = _head_dim(q, v)
    dv = v.shape[-1]

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])]) if x.shape[-1] < width else x

    # A window covering the whole sequence is plain causal attention.
    local_window = (window - 1, 0) if window < q.shape[1] else None
    out = jax.nn.dot_product_attention(
        pad(q),
        pad(k),
        pad(v),
        scale=scale,
        is_causal=True,
        local_window_size=local_window,
        implementation="cudnn",
    )
    return out[..., :dv]
