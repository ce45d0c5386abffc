"""Tile helpers shared by the Pallas (Triton lowering) kernels: padding, masks, loads, dots, exps.

``tl.dot`` wants tiles of at least 16 and powers of two, so kernels pad rows, block
sizes and head dims and mask the padding on loads and stores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
LOG2E = math.log2(math.e)
# Finite stand-in for -inf: keeps exp2(s - m) free of inf - inf.
MASKED = -1e30


def visible_tokens(
    offset: jax.Array, block_length: int, block_stride: int, live: jax.Array | None = None
) -> jax.Array:
    """Compressed tokens a query sees (spec, Eqs. 7-8): those whose whole block of ``l`` keys has
    ended, counted from its segment's first, for ``offset`` = its position minus its segment start
    (``d`` apart: ``(offset - l + 1) // d + 1``, 0 before the first ends or where not ``live``)."""
    ended = offset - (block_length - 1)
    seen = ended >= 0 if live is None else live & (ended >= 0)
    return jnp.where(seen, jax.lax.div(jnp.maximum(ended, 0), block_stride) + 1, 0)


def padded(size: int) -> int:
    return max(16, pl.next_power_of_2(size))


def column_pieces(size: int) -> tuple[tuple[int, int], ...]:
    """``(first lane, width)`` tiles covering a head dim of ``size``: the size rounded up to
    16, cut into powers of two, largest first (192 -> 128 + 64), so no dot pads more than 15
    lanes where one ``padded(192) = 256`` tile would do a third more work."""
    total, pieces = -(-size // 16) * 16, []
    for bit in reversed(range(total.bit_length())):
        if total & (1 << bit):
            pieces.append((total & -(1 << (bit + 1)), 1 << bit))
    return tuple(pieces)


def all_of(*masks: jax.Array | None) -> jax.Array | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out


def lanes(valid: int, padded: int) -> jax.Array | None:
    """``arange(padded) < valid``, or ``None`` when nothing is padded."""
    return None if valid == padded else jnp.arange(padded) < valid


def tile_mask(rows: jax.Array | None, cols: jax.Array | None) -> jax.Array | None:
    return all_of(None if rows is None else rows[:, None], None if cols is None else cols[None, :])


def load(ref, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return ref[...]
    return plt.load(ref, mask=mask, other=0)


def store(ref, value: jax.Array, mask: jax.Array | None) -> None:
    if mask is None:
        ref[...] = value.astype(ref.dtype)
    else:
        plt.store(ref, value.astype(ref.dtype), mask=mask)


def dot_nt(a: jax.Array, b: jax.Array, precision: jax.lax.Precision | None) -> jax.Array:
    """``a @ b.T`` accumulated in float32."""
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def dot(a: jax.Array, b: jax.Array, precision: jax.lax.Precision | None) -> jax.Array:
    """``a @ b`` accumulated in float32."""
    dims = (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def load_pieces(
    ref, rows: slice | pl.Slice, size: int, row_mask: jax.Array | None, lead: tuple = ()
) -> list[jax.Array]:
    """Rows ``rows`` (a slice or ``pl.ds``) of ``ref [*L, R, size']`` at leading indices ``lead``
    (``len(L)`` of them) as its :func:`column_pieces` tiles ``[rows, width]``, rows masked by
    ``row_mask`` and lanes past ``size`` by the tile. The indices go into one indexer: the
    Triton lowering takes one per load."""
    if size < 1:
        raise ValueError(f"size (the head dim to load) must be >= 1, got {size}")
    return [
        load(
            ref.at[(*lead, rows, pl.ds(offset, width))],
            tile_mask(row_mask, lanes(min(size - offset, width), width)),
        )
        for offset, width in column_pieces(size)
    ]


def dot_nt_pieces(a: list[jax.Array], b: list[jax.Array], precision: jax.lax.Precision | None) -> jax.Array:
    """``sum_i a[i] @ b[i].T`` over the column pieces of :func:`load_pieces`, in float32."""
    out = dot_nt(a[0], b[0], precision)
    for a_piece, b_piece in zip(a[1:], b[1:], strict=True):
        out = out + dot_nt(a_piece, b_piece, precision)
    return out


def empty_softmax_state(rows: int, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """An online softmax with nothing seen: ``(acc [rows, width], max [rows], sum [rows])``, float32."""
    return (
        jnp.zeros((rows, width), jnp.float32),
        jnp.full((rows,), MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_softmax_step(
    carry: tuple[jax.Array, jax.Array, jax.Array],
    q: list[jax.Array],
    k: list[jax.Array],
    v: jax.Array,
    valid: jax.Array,
    log2_scale: float,
    precision: jax.lax.Precision | None,
    *,
    flush: bool,
    bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One key tile into the state of :func:`empty_softmax_state` (base 2): ``q [rows, Dk]`` and
    ``k [keys, Dk]`` in :func:`load_pieces`, ``v [keys, Dv']``, ``valid [keys]`` (or
    ``[rows, keys]``) the keys seen; ``bias [rows]`` (base 2) is added to every logit of a row.
    ``flush``: the exps as :func:`exp2_affine` computes them on the GPU (GPU only)."""
    acc, row_max, row_sum = carry
    scores = dot_nt_pieces(q, k, precision)
    seen = valid if valid.ndim == 2 else valid[None, :]
    logits = scores * log2_scale if bias is None else scores * log2_scale + bias[:, None]
    s = jnp.where(seen, logits, MASKED)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    offset = new_max if bias is None else new_max - bias
    p = jnp.where(seen, exp2_affine(scores, log2_scale, offset, flush=flush), 0.0)
    alpha = exp2_affine(row_max[:, None], 1.0, new_max, flush=flush).reshape(row_max.shape)
    row_sum = row_sum * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision)
    return acc, new_max, row_sum


def exp2_affine(x: jax.Array, scale: float, offset: jax.Array, *, flush: bool) -> jax.Array:
    """``exp2(x * scale - offset[:, None])`` in float32, ``x [rows, cols]``, ``offset [rows]``.

    ``flush`` (GPU only): one ``fma.rn.f32`` and one ``ex2.approx.ftz.f32`` (PTX) an element, so
    results below 2^-126 are 0. Without it, ``jnp.exp2`` is libdevice's non-flushing
    ``ex2.approx.f32``, which ptxas expands into a range test and two predicated multiplies around
    the ``MUFU.EX2``, and the scale and the subtraction stay two instructions (LLVM does not fuse
    them): five instructions an element besides the ``MUFU`` instead of one."""
    if x.ndim != 2 or offset.shape != x.shape[:1]:
        raise ValueError(
            f"exp2_affine needs x [rows, cols] and offset [rows], got {x.shape} and {offset.shape}"
        )
    if not flush:
        return jnp.exp2(x * scale - offset[:, None])
    [out] = plt.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;\n\tex2.approx.ftz.f32 $0, $0;",
        args=[
            x.astype(jnp.float32),
            jnp.full(x.shape, scale, jnp.float32),
            jnp.broadcast_to(-offset[:, None], x.shape),
        ],
        constraints="=f,f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return out


def per_query_block(*trailing: int) -> pl.BlockSpec:
    """Block of one (query, KV head) of a ``[B, T, H, ...]`` array for grid ``(T, H, B)``."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((None, None, None, *trailing), lambda t, h, b: (b, t, h, *zeros))


def per_sequence_block(*trailing: int) -> pl.BlockSpec:
    """Block of one (sequence, KV head) of a ``[B, H, ...]`` array for grid ``(., H, B)``."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((None, None, *trailing), lambda _, h, b: (b, h, *zeros))


def require_supported_dtype(q: jax.Array) -> None:
    """Raises ``ValueError`` unless ``q`` is float16, bfloat16 or float32 (what ``tl.dot`` takes)."""
    if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
        raise ValueError(f"q must be float16, bfloat16 or float32 for pallas_triton, got {q.dtype}")
