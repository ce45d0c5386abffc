"""Branches served by cuDNN's fused attention on NVIDIA GPUs.

- ``sliding_window_attention`` (spec, "Sliding window"), implementation ``"cudnn"``: causal
  attention with cuDNN's left window of ``w`` keys, ``(t - w, t]``, which is the spec's
  ``t - w + 1 .. t``.
- ``compressed_attention`` (spec, "Compression branch (Eqs. 7-8)"), implementation
  ``"cudnn"``: query ``t`` sees compressed token ``i`` when ``i*d + l - 1 <= t``, i.e.
  ``i <= floor((t - l + 1) / d)``. The ``d`` consecutive positions ``l - 1 + j*d .. l - 1 +
  j*d + d - 1`` all see tokens ``0..j``, so they make row ``j`` of one plain causal cuDNN call
  over the compressed tokens, as ``d`` times as many query heads (position ``r`` of a row is
  heads ``r * HQ ..``; the compressed keys are repeated ``d`` times over the KV heads, so that
  query head ``r * HQ + hq`` reads KV head ``r * H + hq // G``). The rows are a contiguous slice
  of ``q``. This replaces residue-class rows (every ``d``-th position, shifted per class),
  whose layout needed a transposing copy of ``q`` and of the output.

Both call jax's cuDNN module directly rather than ``jax.nn.dot_product_attention``, which
requires ``Dv == Dk`` and casts the log-sum-exp to the output dtype (bf16 would move ``p_cmp``
by up to 6%, enough to flip top-n picks). This call takes ``Dv != Dk`` (cuDNN's MLA path,
Hopper and newer; on the H200 at T=64K, Dk=192/Dv=128, the window takes 4.2 / 20.9 ms forward /
forward+backward against 5.3 / 26.2 ms with V zero-padded to 192) and returns the lse in
float32. cuDNN reads K/V with fewer heads than q directly (query head ``hq`` uses KV head
``hq // G``, as the spec). Both serve float16/bfloat16 without packed segments, head dims that
are multiples of 8 up to 256 (128 before Hopper).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

_LANE_MULTIPLE = 8  # cuDNN's head dims are multiples of 8

# Signature of the causal attention core of the compressed branch:
# ``(q [B, S, N, Dk], k [B, S, Nk, Dk], v [B, S, Nk, Dv], scale, with_lse) -> out`` or
# ``(out, lse [B, S, N] float32)``; row ``j`` sees keys ``0..j``. Its own VJP may ignore the
# lse cotangent: :func:`_causal_attention_with_lse` adds that term.
CausalAttention = Callable[..., jax.Array | tuple[jax.Array, jax.Array]]


def compute_capability() -> tuple[int, int]:
    """``(major, minor)`` of the default device's CUDA compute capability; ``(0, 0)`` off GPU."""
    if jax.default_backend() != "gpu":
        return (0, 0)
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    major, minor = (int(x) for x in capability.split("."))
    return major, minor


def _max_head_dim() -> int:
    """cuDNN's flash attention takes head dims up to 256 on Hopper and newer, 128 before."""
    return 256 if compute_capability() >= (9, 0) else 128


def _check_common(q: jax.Array, v: jax.Array, segment_ids: jax.Array | None, what: str) -> None:
    if segment_ids is not None:
        raise ValueError(f"segment_ids must be None for the cudnn {what}: jax's cuDNN call has no segments")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"q must be float16 or bfloat16 for the cudnn {what}, got {q.dtype}")
    dk, dv = q.shape[-1], v.shape[-1]
    limit = _max_head_dim()
    if max(dk, dv) > limit or dk % _LANE_MULTIPLE or dv % _LANE_MULTIPLE:
        raise ValueError(
            f"head dims Dk={dk}, Dv={dv} must be multiples of {_LANE_MULTIPLE} and at most {limit} "
            f"for the cudnn {what}"
        )
    if dk != dv and compute_capability() < (9, 0):
        raise ValueError(f"head dims Dk={dk} != Dv={dv} need a Hopper or newer GPU for the cudnn {what}")


def cudnn_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    with_lse: bool = False,
    *,
    window: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal cuDNN attention (a :data:`CausalAttention`), ``q [B, S, N, Dk]``,
    ``k [B, S, Nk, Dk]``, ``v [B, S, Nk, Dv]``: row ``j`` sees keys ``0..j`` (``j - window + 1
    .. j`` with a window). Returns ``out`` or ``(out, lse [B, S, N] float32)``; the VJP ignores
    the lse cotangent."""
    # A private module (see the module docstring), imported here so that importing nsa_jax on
    # CPU or TPU never depends on it.
    from jax._src.cudnn import fused_attention_stablehlo as fused_attention

    length = q.shape[1]
    if length % 2:
        # jax's cuDNN rule for training takes even lengths only; an extra last key is seen
        # only by the extra last query, which is dropped.
        q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
    result = fused_attention.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        mask_type=fused_attention.MaskType.CAUSAL,
        qkv_layout="BTNH",
        sliding_window_length=window,
        return_residual=with_lse,
    )
    if not with_lse:
        return result[:, :length]
    out, lse = result
    return out[:, :length], jnp.swapaxes(lse, 1, 2)[:, :length]  # cuDNN returns lse as [B, N, S]


def check(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> None:
    """Raises ``ValueError`` for window arguments cuDNN's fused attention cannot serve here."""
    del k, window, scale
    _check_common(q, v, segment_ids, "window")


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
    # A window covering the whole sequence is plain causal attention.
    return cudnn_causal_attention(q, k, v, scale, window=window if window < q.shape[1] else None)


# ---------------------------------------------------------------------------- compressed


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _causal_attention_with_lse(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, attend: CausalAttention
) -> tuple[jax.Array, jax.Array]:
    """``attend``'s ``(out, lse)`` with the lse cotangent differentiated, as the reference's."""
    return attend(q, k, v, scale, True)


def _with_lse_forward(q, k, v, scale, attend):
    q, k, v = q.value, k.value, v.value  # CustomVJPPrimal (symbolic_zeros=True)
    outputs, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, scale, True), q, k, v)
    return outputs, (q, k, pullback)


def _with_lse_backward(scale, attend, residuals, cotangents):
    q, k, pullback = residuals
    dout, dlse = cotangents
    if isinstance(dout, SymbolicZero):
        dout = jnp.zeros(dout.aval.shape, dout.aval.dtype)
    lse_shape = q.shape[:3]
    dq, dk, dv = pullback((dout, jnp.zeros(lse_shape, jnp.float32)))
    # In the NSA op the lse only feeds the (integer) top-n, so its cotangent is a symbolic
    # zero and this costs nothing. Otherwise d lse_i = scale * sum_j p_ij (k_j dq_i + q_i dk_j):
    # sum_j p_ij k_j is attention with K as the values, and sum_i p_ij w_i q_i is the value
    # gradient of that attention for the cotangent w_i q_i.
    if not isinstance(dlse, SymbolicZero):
        weight = (scale * dlse.astype(jnp.float32))[..., None]
        key_mean, key_pullback = jax.vjp(lambda values: attend(q, k, values, scale, False), k)
        dq = dq + (weight * key_mean.astype(jnp.float32)).astype(dq.dtype)
        (dk_from_lse,) = key_pullback((weight * q.astype(jnp.float32)).astype(q.dtype))
        dk = dk + dk_from_lse
    return dq, dk, dv


_causal_attention_with_lse.defvjp(_with_lse_forward, _with_lse_backward, symbolic_zeros=True)


def _to_rows(x: jax.Array, rows: int, block_length: int, block_stride: int) -> jax.Array:
    """``[B, T, N, D]`` -> ``[B, rows, d * N, D]``: row ``j`` holds positions ``l - 1 + j * d + r``
    (``r < d``) as heads ``r * N + n``, zeros past ``T``. One contiguous slice of ``x``: no transpose."""
    batch, _, heads, dim = x.shape
    first = block_length - 1
    x = x[:, first : first + rows * block_stride]
    x = jnp.pad(x, ((0, 0), (0, rows * block_stride - x.shape[1]), (0, 0), (0, 0)))
    return x.reshape(batch, rows, block_stride * heads, dim)


def _from_rows(y: jax.Array, length: int, block_length: int, block_stride: int, fill: float) -> jax.Array:
    """Inverse of :func:`_to_rows`: ``[B, rows, d * N, D]`` -> ``[B, T, N, D]``, ``fill`` at the
    positions before ``l - 1`` (they see no compressed token)."""
    batch, rows, width, dim = y.shape
    y = y.reshape(batch, rows * block_stride, width // block_stride, dim)
    y = jnp.pad(y, ((0, 0), (block_length - 1, 0), (0, 0), (0, 0)), constant_values=fill)
    return y[:, :length]


def _complete_tokens(length: int, block_length: int, block_stride: int) -> int:
    """``floor((T - l) / d) + 1``: compressed tokens whose block ends inside ``T``."""
    return max(0, (length - block_length) // block_stride + 1)


def check_compressed(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> None:
    """Raises ``ValueError`` for compressed-attention arguments the cuDNN call cannot serve."""
    del scale
    _check_common(q, v_cmp, segment_ids, "compressed attention")
    rows = _complete_tokens(q.shape[1], block_length, block_stride)
    if rows == 0:
        raise ValueError(
            f"q's length T={q.shape[1]} must be at least block_length={block_length} for the cudnn "
            "compressed attention (no compressed token is complete)"
        )
    if k_cmp.shape[1] < rows:
        raise ValueError(
            f"k_cmp must hold the floor((T - l) / d) + 1 = {rows} complete compressed tokens for the "
            f"cudnn compressed attention, got {k_cmp.shape[1]}"
        )


def compressed_attention_by_rows(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    scale: float,
    attend: CausalAttention,
) -> tuple[jax.Array, jax.Array]:
    """Compressed attention without segments as one causal call of ``attend`` over the
    rows of d consecutive positions (module docstring).

    Args:
      q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]``: token ``i``
        summarises raw keys ``[i*d, i*d + l)``; ``Tc >= floor((T - l) / d) + 1 >= 1``.
      attend: the causal core (:data:`CausalAttention`).

    Returns:
      ``(out [B, T, HQ, Dv]`` in ``q.dtype``, ``lse`` float32 ``[B, T, HQ])``, 0 and ``-inf``
      for ``t < l - 1``.
    """
    length = q.shape[1]
    rows = _complete_tokens(length, block_length, block_stride)
    # Query head r * HQ + hq of a row reads KV head r * H + hq // G: the keys once per r. Tiled in
    # float32 so that the backward sums the d copies' gradients (cuDNN's, in bf16) in float32.
    copies = (1, 1, block_stride, 1)
    k_rows, v_rows = (
        jnp.tile(x[:, :rows].astype(jnp.float32), copies).astype(x.dtype) for x in (k_cmp, v_cmp)
    )
    out, lse = _causal_attention_with_lse(
        _to_rows(q, rows, block_length, block_stride), k_rows, v_rows, scale, attend
    )
    out = _from_rows(out, length, block_length, block_stride, 0.0)
    lse = _from_rows(lse[..., None], length, block_length, block_stride, -jnp.inf)[..., 0]
    return out, lse


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
    """cuDNN compressed attention; arguments and results as :func:`nsa_jax.compressed_attention`
    (float16/bfloat16, no segments: :func:`check_compressed`)."""
    check_compressed(
        q,
        k_cmp,
        v_cmp,
        block_length=block_length,
        block_stride=block_stride,
        scale=scale,
        segment_ids=segment_ids,
    )
    return compressed_attention_by_rows(
        q,
        k_cmp,
        v_cmp,
        block_length=block_length,
        block_stride=block_stride,
        scale=scale,
        attend=cudnn_causal_attention,
    )
