"""Block-sparse flash attention on TPU driven by per-query-tile key-tile lists.

Every NSA branch on TPU is this one kernel family with a different list and mask:

- selection: query tile ``i`` reads the union of the key tiles its queries
  selected, in ascending order (the tile list is built from ``block_indices`` and
  passed as a scalar-prefetch operand; the K/V ``BlockSpec`` index maps read it);
- window and compression: query tile ``i`` reads a contiguous range of key tiles.

Layouts inside (the op wrappers transpose and pad): ``q [B, H, R, Dk']`` with row
``r = t_local * G + g`` of tile ``i`` holding query ``i * P + t_local``, head
``h * G + g`` (all ``G`` heads of a KV head in one tile); ``k [B, H, Tk, Dk']``,
``v [B, H, Tk, Dv']`` with ``Dk'``, ``Dv'`` multiples of 128 lanes.

Masks, computed in the kernel per (row, key):

- ``"select"``: ``row_info [B, H, R, n + 1]`` holds the first key of each selected
  block (absolute position, ``INVALID`` for an unused slot) and the query position
  ``t``; key ``p`` is visible iff ``p <= t`` and ``start <= p < start + l'`` for some
  slot.
- ``"range"``: ``row_info [B, 1, R, 2]`` holds ``(lo, t)``, ``key_info [B, 2, Tk]``
  holds ``(a, e)`` per key; visible iff ``a >= lo`` and ``e <= t``. The window
  uses ``a = e = p`` and ``lo = max(s0, t - w + 1)``; compression uses the
  compressed token's first and last raw position and ``lo = s0``.

Kernels (all with a float32 online softmax; a row with nothing visible outputs 0
and log-sum-exp ``-inf``):

- forward, grid ``(B, H, nQ, U)``, last axis sequential over the tile list;
- dQ, same grid, recomputes ``P`` from the saved log-sum-exp;
- dK/dV, grid ``(B, H, E)`` over the entries of the inverse map
  (:func:`pallas_kernels.tpu.inverse_map.build_inverse_map`) sorted by key tile: the
  output block of a key tile stays resident while its entries are consecutive, is
  zeroed at the first and stored at the last. Deterministic, no atomics.

Scalar-prefetch operands live in SMEM, which is small: the lists are split into
several ``pallas_call``s of at most ``smem_words`` words each (query tiles for the
forward and dQ, entries for dK/dV, whose partial sums are added).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu.inverse_map import build_inverse_map, touched_tiles

# Finite stand-in for -inf in the running max: keeps exp(s - m) free of inf - inf.
MASKED = -1e30
# First key of an unused selection slot: far below any position, no overflow when
# the block size is added.
INVALID = -(2**30)
# Key attribute of a key that no query may see (padding, empty compressed slots).
NEVER = 2**30


@dataclasses.dataclass(frozen=True)
class Config:
    """Static facts of one call (hashable: the custom_vjp's non-differentiable arg).

    Attributes:
      mode: ``"select"`` or ``"range"``.
      scale: logit scale.
      rows: rows of a query tile (``P * G``, a multiple of 8).
      key_tile: keys per key tile.
      width: ``U``, length of each query tile's key-tile list.
      num_slots: ``n`` (``"select"`` only).
      span: selection block size ``l'`` (``"select"`` only).
      smem_words: scalar-prefetch budget per pallas_call.
      interpret: ``None`` to compile for TPU, else the ``pltpu.InterpretParams``.
    """

    mode: str
    scale: float
    rows: int
    key_tile: int
    width: int
    num_slots: int = 0
    span: int = 0
    smem_words: int = 32 * 1024
    interpret: Any = None


def interpret_params(interpret: Any) -> Any:
    """Maps the registry's ``interpret`` flag to Pallas TPU interpret mode.

    ``True`` gives ``pltpu.InterpretParams()``; ``False``/``None`` compiles with
    Mosaic; an ``InterpretParams`` (e.g. with ``detect_races=True``) is used as is.
    """
    if interpret is True:
        return pltpu.InterpretParams()
    if interpret is False or interpret is None:
        return None
    return interpret


def _precision(dtype: jnp.dtype) -> jax.lax.Precision | None:
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], precision) -> jax.Array:
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _visible(cfg: Config, tile: jax.Array, row_ref, key_ref) -> jax.Array:
    """bool ``[rows, key_tile]``: which keys of ``tile`` each row of the query tile sees."""
    info = row_ref[...]
    if cfg.mode == "select":
        n = cfg.num_slots
        pos = tile * cfg.key_tile + jax.lax.broadcasted_iota(jnp.int32, (cfg.rows, cfg.key_tile), 1)
        hit = jnp.zeros((cfg.rows, cfg.key_tile), jnp.bool_)
        for slot in range(n):
            start = info[:, slot : slot + 1]
            hit = hit | ((pos >= start) & (pos < start + cfg.span))
        return hit & (pos <= info[:, n : n + 1])
    keys = key_ref[...]
    return (keys[0:1, :] >= info[:, 0:1]) & (keys[1:2, :] <= info[:, 1:2])


def _chunks(total: int, per_call: int) -> list[tuple[int, int]]:
    per_call = max(1, min(per_call, total))
    return [(start, min(per_call, total - start)) for start in range(0, total, per_call)]


# ----------------------------------------------------------------------------- forward


def _forward_kernel(tiles_ref, counts_ref, q_ref, k_ref, v_ref, row_ref, *rest, cfg, heads, num_q):
    if cfg.mode == "range":
        key_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    else:
        key_ref = None
        o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    b, h, i, j = (pl.program_id(axis) for axis in range(4))
    index = (b * heads + h) * num_q + i
    count = counts_ref[index]

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < count)
    def _():
        tile = tiles_ref[index * cfg.width + j]
        q = q_ref[...]
        v = v_ref[...]
        precision = _precision(q.dtype)
        s = _dot(q, k_ref[...], (1, 1), precision) * cfg.scale
        visible = _visible(cfg, tile, row_ref, key_ref)
        s = jnp.where(visible, s, MASKED)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, (1, 0), precision)
        m_sc[...] = m_new

    @pl.when(j == cfg.width - 1)
    def _():
        total = l_sc[...]
        nonempty = total > 0.0
        safe = jnp.where(nonempty, total, 1.0)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, m_sc[...] + jnp.log(safe), -jnp.inf)


def _key_tile_maps(cfg: Config, heads: int, size: int):
    """Index maps of grid ``(b, h, i, j)`` that fetch the ``j``-th listed key tile of query
    tile ``i``: one for K/V blocks ``[B, H, T, D]``, one for key info ``[B, 1, T]``."""

    def tile(b, h, i, j, tiles_ref):
        return tiles_ref[((b * heads + h) * size + i) * cfg.width + j]

    def kv_map(b, h, i, j, tiles_ref, counts_ref):
        return (b, h, tile(b, h, i, j, tiles_ref), 0)

    def key_info_map(b, h, i, j, tiles_ref, counts_ref):
        return (b, 0, tile(b, h, i, j, tiles_ref))

    return kv_map, key_info_map


def _row_index(cfg: Config, row_heads: int):
    if row_heads == 1:
        return lambda b, h, i: (b, 0, i, 0)
    return lambda b, h, i: (b, h, i, 0)


def _forward(q, k, v, row_info, key_info, tiles, counts, cfg: Config):
    batch, heads, num_rows, dk = q.shape
    dv = v.shape[-1]
    num_q = num_rows // cfg.rows
    row_heads = row_info.shape[1]
    per_call = cfg.smem_words // (batch * heads * (cfg.width + 1))
    outs, lses = [], []
    for start, size in _chunks(num_q, per_call):
        tiles_c = tiles[:, :, start : start + size].reshape(-1)
        counts_c = counts[:, :, start : start + size].reshape(-1)

        kv_map, key_info_map = _key_tile_maps(cfg, heads, size)

        row_of = _row_index(cfg, row_heads)
        in_specs = [
            pl.BlockSpec((None, None, cfg.rows, dk), lambda b, h, i, j, *_, s=start: (b, h, i + s, 0)),
            pl.BlockSpec((None, None, cfg.key_tile, dk), kv_map),
            pl.BlockSpec((None, None, cfg.key_tile, dv), kv_map),
            pl.BlockSpec(
                (None, None, cfg.rows, row_info.shape[-1]),
                lambda b, h, i, j, *_, s=start, row_of=row_of: row_of(b, h, i + s),
            ),
        ]
        operands = [q, k, v, row_info]
        if cfg.mode == "range":
            in_specs.append(pl.BlockSpec((None, 2, cfg.key_tile), key_info_map))
            operands.append(key_info)
        out_specs = [
            pl.BlockSpec((None, None, cfg.rows, dv), lambda b, h, i, j, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, cfg.rows, 1), lambda b, h, i, j, *_: (b, h, i, 0)),
        ]
        out, lse = pl.pallas_call(
            functools.partial(_forward_kernel, cfg=cfg, heads=heads, num_q=size),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(batch, heads, size, cfg.width),
                in_specs=in_specs,
                out_specs=out_specs,
                scratch_shapes=[
                    pltpu.VMEM((cfg.rows, 1), jnp.float32),
                    pltpu.VMEM((cfg.rows, 1), jnp.float32),
                    pltpu.VMEM((cfg.rows, dv), jnp.float32),
                ],
            ),
            out_shape=[
                jax.ShapeDtypeStruct((batch, heads, size * cfg.rows, dv), q.dtype),
                jax.ShapeDtypeStruct((batch, heads, size * cfg.rows, 1), jnp.float32),
            ],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
            ),
            interpret=cfg.interpret,
            name=f"nsa_{cfg.mode}_fwd",
        )(tiles_c, counts_c, *operands)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


# ----------------------------------------------------------------------------- dQ


def _dq_kernel(
    tiles_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, row_ref, *rest, cfg, heads, num_q
):
    if cfg.mode == "range":
        key_ref, dq_ref, acc_sc = rest
    else:
        key_ref = None
        dq_ref, acc_sc = rest
    b, h, i, j = (pl.program_id(axis) for axis in range(4))
    index = (b * heads + h) * num_q + i
    count = counts_ref[index]

    @pl.when(j == 0)
    def _():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < count)
    def _():
        tile = tiles_ref[index * cfg.width + j]
        q = q_ref[...]
        k = k_ref[...]
        precision = _precision(q.dtype)
        s = _dot(q, k, (1, 1), precision) * cfg.scale
        visible = _visible(cfg, tile, row_ref, key_ref)
        p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
        dp = _dot(do_ref[...], v_ref[...], (1, 1), precision)
        ds = p * (dp - delta_ref[...])
        acc_sc[...] += _dot(ds.astype(k.dtype), k, (1, 0), precision)

    @pl.when(j == cfg.width - 1)
    def _():
        dq_ref[...] = acc_sc[...] * cfg.scale


def _dq(q, k, v, do, lse, delta, row_info, key_info, tiles, counts, cfg: Config):
    batch, heads, num_rows, dk = q.shape
    dv = v.shape[-1]
    num_q = num_rows // cfg.rows
    row_heads = row_info.shape[1]
    per_call = cfg.smem_words // (batch * heads * (cfg.width + 1))
    outs = []
    for start, size in _chunks(num_q, per_call):
        tiles_c = tiles[:, :, start : start + size].reshape(-1)
        counts_c = counts[:, :, start : start + size].reshape(-1)

        kv_map, key_info_map = _key_tile_maps(cfg, heads, size)

        def q_side(width, s=start):
            return pl.BlockSpec((None, None, cfg.rows, width), lambda b, h, i, j, *_: (b, h, i + s, 0))

        row_of = _row_index(cfg, row_heads)
        in_specs = [
            q_side(dk),
            pl.BlockSpec((None, None, cfg.key_tile, dk), kv_map),
            pl.BlockSpec((None, None, cfg.key_tile, dv), kv_map),
            q_side(dv),
            q_side(1),
            q_side(1),
            pl.BlockSpec(
                (None, None, cfg.rows, row_info.shape[-1]),
                lambda b, h, i, j, *_, s=start, row_of=row_of: row_of(b, h, i + s),
            ),
        ]
        operands = [q, k, v, do, lse, delta, row_info]
        if cfg.mode == "range":
            in_specs.append(pl.BlockSpec((None, 2, cfg.key_tile), key_info_map))
            operands.append(key_info)
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, cfg=cfg, heads=heads, num_q=size),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(batch, heads, size, cfg.width),
                in_specs=in_specs,
                out_specs=pl.BlockSpec((None, None, cfg.rows, dk), lambda b, h, i, j, *_: (b, h, i, 0)),
                scratch_shapes=[pltpu.VMEM((cfg.rows, dk), jnp.float32)],
            ),
            out_shape=jax.ShapeDtypeStruct((batch, heads, size * cfg.rows, dk), jnp.float32),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
            ),
            interpret=cfg.interpret,
            name=f"nsa_{cfg.mode}_dq",
        )(tiles_c, counts_c, *operands)
        outs.append(dq)
    return jnp.concatenate(outs, axis=2)


# ----------------------------------------------------------------------------- dK / dV


def _dkv_kernel(
    key_tiles_ref,
    query_tiles_ref,
    entries_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    row_ref,
    *rest,
    cfg,
    heads,
    width,
):
    if cfg.mode == "range":
        key_ref, dk_ref, dv_ref, dk_sc, dv_sc = rest
    else:
        key_ref = None
        dk_ref, dv_ref, dk_sc, dv_sc = rest
    b, h, e = (pl.program_id(axis) for axis in range(3))
    base = (b * heads + h) * width
    count = entries_ref[b * heads + h]
    tile = key_tiles_ref[base + e]
    first = (e == 0) | (key_tiles_ref[base + jnp.maximum(e - 1, 0)] != tile)
    last = (e == count - 1) | (key_tiles_ref[base + jnp.minimum(e + 1, width - 1)] != tile)
    active = e < count

    @pl.when(active & first)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(active)
    def _():
        q = q_ref[...]
        do = do_ref[...]
        precision = _precision(q.dtype)
        s = _dot(q, k_ref[...], (1, 1), precision) * cfg.scale
        visible = _visible(cfg, tile, row_ref, key_ref)
        p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
        dv_sc[...] += _dot(p.astype(do.dtype), do, (0, 0), precision)
        dp = _dot(do, v_ref[...], (1, 1), precision)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, (0, 0), precision)

    @pl.when(active & last)
    def _():
        dk_ref[...] = dk_sc[...] * cfg.scale
        dv_ref[...] = dv_sc[...]


def _dkv(q, k, v, do, lse, delta, row_info, key_info, tiles, counts, cfg: Config):
    batch, heads, _, dk = q.shape
    num_keys, dv = v.shape[2], v.shape[3]
    num_key_tiles = num_keys // cfg.key_tile
    row_heads = row_info.shape[1]
    key_tiles, query_tiles, num_entries = build_inverse_map(tiles, counts, num_key_tiles)
    total = key_tiles.shape[-1]
    per_call = (cfg.smem_words // (batch * heads) - 1) // 2
    dk_sum = jnp.zeros((batch, heads, num_keys, dk), jnp.float32)
    dv_sum = jnp.zeros((batch, heads, num_keys, dv), jnp.float32)
    for start, size in _chunks(total, per_call):
        key_c = key_tiles[:, :, start : start + size]
        query_c = query_tiles[:, :, start : start + size]
        entries_c = jnp.clip(num_entries - start, 0, size).astype(jnp.int32)

        def k_side(width, size=size):
            def index(b, h, e, key_ref, query_ref, entries_ref):
                return (b, h, key_ref[(b * heads + h) * size + e], 0)

            return pl.BlockSpec((None, None, cfg.key_tile, width), index)

        def q_side(width, size=size):
            def index(b, h, e, key_ref, query_ref, entries_ref):
                return (b, h, query_ref[(b * heads + h) * size + e], 0)

            return pl.BlockSpec((None, None, cfg.rows, width), index)

        def row_index(b, h, e, key_ref, query_ref, entries_ref, size=size):
            return (b, h if row_heads > 1 else 0, query_ref[(b * heads + h) * size + e], 0)

        def key_info_index(b, h, e, key_ref, query_ref, entries_ref, size=size):
            return (b, 0, key_ref[(b * heads + h) * size + e])

        in_specs = [
            q_side(dk),
            k_side(dk),
            k_side(dv),
            q_side(dv),
            q_side(1),
            q_side(1),
            pl.BlockSpec((None, None, cfg.rows, row_info.shape[-1]), row_index),
        ]
        operands = [q, k, v, do, lse, delta, row_info]
        if cfg.mode == "range":
            in_specs.append(pl.BlockSpec((None, 2, cfg.key_tile), key_info_index))
            operands.append(key_info)
        dk_c, dv_c = pl.pallas_call(
            functools.partial(_dkv_kernel, cfg=cfg, heads=heads, width=size),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(batch, heads, size),
                in_specs=in_specs,
                out_specs=[k_side(dk), k_side(dv)],
                scratch_shapes=[
                    pltpu.VMEM((cfg.key_tile, dk), jnp.float32),
                    pltpu.VMEM((cfg.key_tile, dv), jnp.float32),
                ],
            ),
            out_shape=[
                jax.ShapeDtypeStruct((batch, heads, num_keys, dk), jnp.float32),
                jax.ShapeDtypeStruct((batch, heads, num_keys, dv), jnp.float32),
            ],
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=cfg.interpret,
            name=f"nsa_{cfg.mode}_dkv",
        )(key_c.reshape(-1), query_c.reshape(-1), entries_c.reshape(-1), *operands)
        # Key tiles no entry of this call visited hold garbage: keep only the visited ones.
        touched = touched_tiles(key_c, entries_c, num_key_tiles)
        touched = jnp.repeat(touched, cfg.key_tile, axis=-1)[..., None]
        dk_sum = dk_sum + jnp.where(touched, dk_c, 0.0)
        dv_sum = dv_sum + jnp.where(touched, dv_c, 0.0)
    return dk_sum, dv_sum


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def attend(q, k, v, row_info, key_info, tiles, counts, cfg: Config):
    """Block-sparse attention in the kernel layouts (module docstring).

    Args:
      q: ``[B, H, R, Dk']``; k: ``[B, H, Tk, Dk']``; v: ``[B, H, Tk, Dv']``.
      row_info: int32 ``[B, H or 1, R, C]``; key_info: int32 ``[B, 2, Tk]`` (range
        mode) or ``None``.
      tiles: int32 ``[B, H, nQ, U]`` key-tile lists, unused steps repeating the last
        valid tile; counts: int32 ``[B, H, nQ]``.

    Returns:
      ``(out [B, H, R, Dv'] in q.dtype, lse float32 [B, H, R, 1])``; both
      differentiable (``lse`` for the compression branch).
    """
    return _forward(q, k, v, row_info, key_info, tiles, counts, cfg)


def _attend_fwd(q, k, v, row_info, key_info, tiles, counts, cfg):
    out, lse = _forward(q, k, v, row_info, key_info, tiles, counts, cfg)
    return (out, lse), (q, k, v, row_info, key_info, tiles, counts, out, lse)


def _attend_bwd(cfg, residuals, cotangents):
    q, k, v, row_info, key_info, tiles, counts, out, lse = residuals
    d_out, d_lse = cotangents
    # d lse / d s = p, so the lse cotangent enters as a shift of delta = rowsum(dO * O).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    delta = delta - d_lse.astype(jnp.float32)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    d_out = d_out.astype(q.dtype)
    dq = _dq(q, k, v, d_out, finite_lse, delta, row_info, key_info, tiles, counts, cfg)
    dk, dv = _dkv(q, k, v, d_out, finite_lse, delta, row_info, key_info, tiles, counts, cfg)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


attend.defvjp(_attend_fwd, _attend_bwd)
