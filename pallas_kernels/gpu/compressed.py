"""Compressed attention (spec, "Compression branch (Eqs. 7-8)") as Pallas kernels, Triton lowering.

Layouts follow :func:`nsa_jax.compressed_attention`: ``q [B, T, HQ, Dk]``, compressed
keys ``k_cmp [B, Tc, H, Dk]`` and values ``v_cmp [B, Tc, H, Dv]`` in the slot layout of
:mod:`nsa_jax.segments`. Internally ``q`` is viewed as ``[B, T, H, G, Dk]``.

Group-centric tiles (spec, "Kernel design"): a query tile holds ``rows`` rows, row
``r`` being query head ``r % G'`` of position ``p0 + r // G'`` (``G' = next_pow2(G)``),
so the ``G`` heads of a KV head share every key tile and a small ``G`` packs more
positions into the tile (``G = 1``: ``rows`` positions; ``G = 16``: ``rows / 16``).

Visibility (spec, Eqs. 7-8 and packing): query ``t`` of the segment starting at ``s0``
sees exactly the slots ``[lo, lo + count)`` with ``lo = ceil(s0 / d)`` and ``count`` the
compressed tokens of its segment whose block has ended, ``(t - s0 - l + 1) // d + 1``
(0 before the first block ends), clipped to ``Tc``. Slots of earlier segments lie below
``lo`` and later ones above, so one interval per row replaces a ``[T, Tc]`` mask.

Three kernels, all with an online or recomputed softmax in float32 (base 2):

- forward, grid ``(query tiles, H, B)``: streams the key tiles that some row of the
  tile sees; tiles every live row sees wholly skip the mask. Writes ``out`` and the
  natural log-sum-exp (``-inf`` and ``out = 0`` for a row that sees nothing).
- dQ, grid ``(query tiles, H, B)``: the same walk, recomputing ``P`` from the
  log-sum-exp; also writes ``delta = rowsum(dO * O) - dlse`` for the dK/dV kernel
  (the ``dlse`` term makes the log-sum-exp output differentiable as in the reference).
- dK/dV, grid ``(H, key tiles * S, B)``: one compressed key tile per program (or one of
  ``S = dkv_splits`` equal shares of its query tiles, each writing a float32 partial
  that XLA sums), walking backwards over the query tiles that can see one of its tokens
  (from the first query after the tile's first block ends to the end of its last
  token's segment); no atomics, one writer per output element, memory linear in ``T``.
  The key tile is the ``M`` side of all four of its dots, so it needs at least 64 tokens
  for Hopper's wgmma (32 compiles to mma.sync), and 128 with 8 warps so that the two
  warpgroups do not both compute the same 64 rows. The KV head is the fastest grid axis
  so that the heavy (early) key tiles of every head start first: key-major order leaves
  a third of the SMs idle at the end once a head has only 64 key tiles.

Sliding window (spec, "Sliding window"): with ``l = d = 1`` the slots are the raw
positions and each row sees ``[s0, t]``; a ``window`` ``w`` raises the interval's start to
``t - w + 1``, so the same three kernels compute :func:`sliding_window_attention`, for
the inputs cuDNN does not serve (packed segments, float32).

Heavy query tiles (late positions) are launched first. Rows and ``Dv`` are padded to
powers of two (``tl.dot`` needs at least 16) with masked loads and stores; ``Dk`` is
cut into power-of-two pieces (192 = 128 + 64) whose dots are summed, so any ``G``,
``Dk != Dv`` and any ``T`` are served without padding 192 to 256.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from nsa_jax.segments import compressed_token_starts, segment_starts
from pallas_kernels.gpu.tiles import (
    LOG2E,
    MASKED,
    column_pieces,
    dot,
    dot_nt,
    lanes,
    load,
    padded,
    require_supported_dtype,
    store,
    tile_mask,
    visible_tokens,
)

LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class CompressedTuning:
    """Tile sizes, warps and pipeline depth of the three kernels.

    ``*_rows``: query rows (positions times ``G'`` heads) per tile, ``*_keys``:
    compressed tokens per key tile; powers of two, at least 16. ``dkv_splits``: programs
    per dK/dV key tile, each walking an equal share of its query tiles and writing a
    float32 partial that XLA sums (more programs than SMs for large key tiles).
    """

    fwd_rows: int = 128
    fwd_keys: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 2
    dq_rows: int = 64
    dq_keys: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    dkv_rows: int = 128
    dkv_keys: int = 32
    dkv_warps: int = 8
    dkv_stages: int = 2
    dkv_splits: int = 1

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
            if (name.endswith("_rows") or name.endswith("_keys")) and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


# 16-bit inputs, keyed by the padded head dims (max(16, next_pow2(Dk)), max(16, next_pow2(Dv))).
# Every dot has 128 rows (M): with 8 warps Triton lays M = 64 over both warpgroups twice
# (warpsPerCTA [8, 1]), so 64-row score tiles do their dots twice, and the dK/dV kernel's
# 32-token key tiles compile to mma.sync instead of wgmma. 128-token dK/dV key tiles are
# 32 per head at T = 64K, fewer programs than SMs: two splits per key tile restore the
# balance. The fastest candidates of the H200 sweep at T = 64K, G = 16, bf16
# (experiments/results/compression_sweep_h200.md, forward / forward+backward ms):
# Dk = 192: 128-key forward tiles and 64-key dQ tiles, 14.85 / 68.81 (the first 128-token
# dK/dV layout 16.07 / 76.67, 32-token dK/dV tiles 16.07 / 113.71); Dk = 128: three
# pipeline stages everywhere, 11.96 / 47.01 (two stages 13.37 / 59.70, 32-token dK/dV
# tiles 13.37 / 94.85).
_TUNING_BY_HEAD_DIMS: dict[tuple[int, int], CompressedTuning] = {
    (128, 128): CompressedTuning(
        fwd_stages=3,
        dq_rows=128,
        dq_keys=64,
        dq_stages=3,
        dkv_keys=128,
        dkv_rows=32,
        dkv_stages=3,
        dkv_splits=2,
    ),
    (256, 128): CompressedTuning(
        fwd_keys=128, dq_rows=128, dq_keys=64, dkv_keys=128, dkv_rows=32, dkv_splits=2
    ),
}
# Other head dims take the Dk = 128 entry (smaller ones need fewer registers; larger ones are untuned).
DEFAULT_TUNING = _TUNING_BY_HEAD_DIMS[(128, 128)]
# float32 tiles take twice the registers and shared memory: half the rows and keys keep
# shared memory under the H200's 227 KB at Dk = 192.
FLOAT32_TUNING = CompressedTuning(
    fwd_rows=64, fwd_keys=32, dq_rows=32, dq_keys=32, dkv_rows=64, dkv_keys=16, dkv_stages=1
)


def default_tuning(dtype: jnp.dtype, dk: int, dv: int) -> CompressedTuning:
    """Tiles for inputs of ``dtype`` and head dims ``dk``/``dv``: the table entry, else
    :data:`DEFAULT_TUNING`; float32 always :data:`FLOAT32_TUNING`."""
    if jnp.dtype(dtype) == jnp.float32:
        return FLOAT32_TUNING
    return _TUNING_BY_HEAD_DIMS.get((padded(dk), padded(dv)), DEFAULT_TUNING)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shape facts shared by the kernels (hashable: a custom_vjp nondiff arg)."""

    batch: int
    length: int
    slots: int
    heads: int
    group: int
    dk: int
    dv: int
    block_length: int
    block_stride: int
    scale: float
    segmented: bool
    window: int | None
    dtype: str
    interpret: bool
    tuning: CompressedTuning

    @property
    def heads_pow2(self) -> int:
        return pl.next_power_of_2(self.group)

    @property
    def dk_padded(self) -> int:
        return padded(self.dk)

    @property
    def dk_pieces(self) -> tuple[tuple[int, int], ...]:
        """``(offset, width)`` column pieces of ``Dk`` (:func:`column_pieces`: 192 = 128 + 64)."""
        return column_pieces(self.dk)

    @property
    def dv_padded(self) -> int:
        return padded(self.dv)

    def rows(self, wanted: int) -> int:
        """Rows of a query tile: ``wanted``, or more when one position's heads need more."""
        return max(wanted, self.heads_pow2)

    def positions(self, wanted: int) -> int:
        return self.rows(wanted) // self.heads_pow2

    def query_tiles(self, wanted: int) -> int:
        return -(-self.length // self.positions(wanted))

    def key_tiles(self, keys: int) -> int:
        return -(-self.slots // keys)

    def slots_padded(self, keys: int) -> int:
        """Rows of a compressed-key block: whole key tiles, so no tile reads past its block."""
        return self.key_tiles(keys) * keys

    @property
    def precision(self) -> jax.lax.Precision | None:
        """Full float32 dots for float32 inputs (the Triton default would be TF32)."""
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None

    def params(self, warps: int, stages: int) -> plt.CompilerParams:
        return plt.CompilerParams(num_warps=warps, num_stages=stages)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The rows of one query tile: indices to gather, liveness, visible slot intervals."""

    position: jax.Array  # [rows] int32, clamped into [0, T)
    head: jax.Array  # [rows] int32, clamped into [0, G)
    live: jax.Array  # [rows] bool: a real (position, head)
    target: jax.Array  # [rows] int32: store position, T for dead rows
    lo: jax.Array  # [rows] int32: first visible slot
    hi: jax.Array  # [rows] int32: one past the last visible slot (lo when none)


def _tile_rows(geo: _Geometry, starts_ref, tile: jax.Array, rows: int) -> _Rows:
    """Rows of query tile ``tile`` with their visible slot intervals (spec, Eqs. 7-8)."""
    row = jnp.arange(rows)
    position = tile * (rows // geo.heads_pow2) + row // geo.heads_pow2
    head = row % geo.heads_pow2
    live = (position < geo.length) & (head < geo.group)
    position_c = jnp.where(live, position, 0)
    s0 = plt.load(starts_ref.at[position_c], mask=live, other=0)
    lo = jax.lax.div(s0 + geo.block_stride - 1, geo.block_stride)
    count = visible_tokens(position_c - s0, geo.block_length, geo.block_stride, live)
    hi = jnp.maximum(jnp.minimum(lo + count, geo.slots), lo)
    if geo.window is not None:
        lo = jnp.minimum(jnp.maximum(lo, position_c - geo.window + 1), hi)
    return _Rows(
        position=position_c,
        head=jnp.where(live, head, 0),
        live=live,
        target=jnp.where(live, position, geo.length),
        lo=lo,
        hi=hi,
    )


def _key_tile_ranges(rows: _Rows, keys: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``first <= full_lo <= full_hi <= last``: key tiles seen by some row, and the middle
    run ``[full_lo, full_hi)`` that every live row sees wholly (no mask needed)."""
    big = jnp.int32(2**30)
    sees = rows.hi > rows.lo
    first = jax.lax.div(jnp.min(jnp.where(sees, rows.lo, big)), keys)
    last = jax.lax.div(jnp.max(jnp.where(sees, rows.hi, 0)) + keys - 1, keys)
    first = jnp.minimum(first, last)
    max_lo = jnp.max(jnp.where(rows.live, rows.lo, 0))
    min_hi = jnp.min(jnp.where(rows.live, rows.hi, big))
    full_lo = jnp.clip(jax.lax.div(max_lo + keys - 1, keys), first, last)
    full_hi = jnp.clip(jax.lax.div(min_hi, keys), full_lo, last)
    return first, full_lo, full_hi, last


def _visible(rows: _Rows, slot: jax.Array) -> jax.Array:
    """bool ``[rows, keys]``: row sees slot."""
    return (slot[None, :] >= rows.lo[:, None]) & (slot[None, :] < rows.hi[:, None])


def _visible_transposed(rows: _Rows, slot: jax.Array) -> jax.Array:
    """bool ``[keys, rows]``: row sees slot (built transposed: no transpose in the kernel)."""
    return (slot[:, None] >= rows.lo[None, :]) & (slot[:, None] < rows.hi[None, :])


def _load_rows(ref, rows: _Rows, width: int, padded_width: int, offset: int = 0) -> jax.Array:
    """Gathers columns ``[offset, offset + padded_width)`` of the rows of a per-head
    ``[T, G', width']`` ref; zeros where dead or past ``width``."""
    lane = offset + jnp.arange(padded_width)
    return plt.load(
        ref.at[rows.position[:, None], rows.head[:, None], lane[None, :]],
        mask=rows.live[:, None] & (lane < width)[None, :],
        other=0,
    )


def _store_rows(ref, rows: _Rows, value: jax.Array, width: int, offset: int = 0) -> None:
    lane = offset + jnp.arange(value.shape[1])
    plt.store(
        ref.at[rows.target[:, None], rows.head[:, None], lane[None, :]],
        value.astype(ref.dtype),
        mask=rows.live[:, None] & (lane < width)[None, :],
    )


def _load_row_values(ref, rows: _Rows) -> jax.Array:
    """Gathers ``[rows]`` of a per-head ``[T, G']`` float ref, zeros where dead."""
    return plt.load(ref.at[rows.position, rows.head], mask=rows.live, other=0)


def _key_tile(
    geo: _Geometry,
    ref,
    tile: jax.Array,
    keys: int,
    width: int,
    masked: bool,
    piece: tuple[int, int] | None = None,
) -> jax.Array:
    """Key tile ``[keys, w]``: columns ``piece = (offset, w)`` (default: all, padded)."""
    offset, piece_width = piece or (0, padded(width))
    slot_rows = (tile * keys + jnp.arange(keys) < geo.slots) if masked else None
    cols = lanes(min(width - offset, piece_width), piece_width)
    return load(ref.at[pl.ds(tile * keys, keys), pl.ds(offset, piece_width)], tile_mask(slot_rows, cols))


def _query_pieces(geo: _Geometry, ref, rows: _Rows) -> list[jax.Array]:
    return [_load_rows(ref, rows, geo.dk, width, offset) for offset, width in geo.dk_pieces]


def _key_pieces(geo: _Geometry, ref, tile: jax.Array, keys: int, masked: bool) -> list[jax.Array]:
    return [_key_tile(geo, ref, tile, keys, geo.dk, masked, piece) for piece in geo.dk_pieces]


def _scores(geo: _Geometry, a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
    """``a @ b.T`` summed over the ``Dk`` pieces, float32."""
    out = dot_nt(a[0], b[0], geo.precision)
    for x, y in zip(a[1:], b[1:], strict=True):
        out = out + dot_nt(x, y, geo.precision)
    return out


def _finite_lse2(lse: jax.Array) -> jax.Array:
    """Natural log-sum-exp to base 2; ``-inf`` (a row that sees nothing) reads as 0."""
    return jnp.where(jnp.abs(lse) < jnp.inf, lse * LOG2E, 0.0)


def _forward_kernel(starts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, geo: _Geometry):
    """One query tile of one KV head: ``q_ref [T, G', Dk']``, ``k_ref [Tc, Dk']``, ``v_ref [Tc, Dv']``."""
    tuning = geo.tuning
    keys = tuning.fwd_keys
    tile = geo.query_tiles(tuning.fwd_rows) - 1 - pl.program_id(0)
    rows = _tile_rows(geo, starts_ref, tile, geo.rows(tuning.fwd_rows))
    q = _query_pieces(geo, q_ref, rows)
    log2_scale = geo.scale * LOG2E

    def step(masked: bool):
        def body(index, carry):
            acc, row_max, row_sum = carry
            k = _key_pieces(geo, k_ref, index, keys, masked)
            v = _key_tile(geo, v_ref, index, keys, geo.dv, masked)
            s = _scores(geo, q, k) * log2_scale
            if masked:
                visible = _visible(rows, index * keys + jnp.arange(keys))
                s = jnp.where(visible, s, MASKED)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
            p = jnp.exp2(s - new_max[:, None])
            if masked:
                p = jnp.where(visible, p, 0.0)
            alpha = jnp.exp2(row_max - new_max)
            row_sum = row_sum * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, geo.precision)
            return acc, new_max, row_sum

        return body

    first, full_lo, full_hi, last = _key_tile_ranges(rows, keys)
    tile_rows = q[0].shape[0]
    carry = (
        jnp.zeros((tile_rows, geo.dv_padded), jnp.float32),
        jnp.full((tile_rows,), MASKED, jnp.float32),
        jnp.zeros((tile_rows,), jnp.float32),
    )
    carry = jax.lax.fori_loop(full_lo, full_hi, step(False), carry)
    carry = jax.lax.fori_loop(first, full_lo, step(True), carry)
    acc, row_max, row_sum = jax.lax.fori_loop(full_hi, last, step(True), carry)
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    _store_rows(o_ref, rows, acc / safe_sum[:, None], geo.dv)
    lse = jnp.where(seen, (row_max + jnp.log2(safe_sum)) * LN2, -jnp.inf)
    plt.store(lse_ref.at[rows.target, rows.head], lse, mask=rows.live)


def _dq_kernel(
    starts_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dlse_ref, dq_ref, delta_ref, *, geo: _Geometry
):
    """dQ of one query tile of one KV head, and ``delta = rowsum(dO * O) - dlse`` of its rows."""
    tuning = geo.tuning
    keys = tuning.dq_keys
    tile = geo.query_tiles(tuning.dq_rows) - 1 - pl.program_id(0)
    rows = _tile_rows(geo, starts_ref, tile, geo.rows(tuning.dq_rows))
    q = _query_pieces(geo, q_ref, rows)
    do = _load_rows(do_ref, rows, geo.dv, geo.dv_padded)
    out = _load_rows(o_ref, rows, geo.dv, geo.dv_padded)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=1)
    delta = delta - _load_row_values(dlse_ref, rows)
    plt.store(delta_ref.at[rows.target, rows.head], delta, mask=rows.live)
    lse2 = _finite_lse2(_load_row_values(lse_ref, rows))
    log2_scale = geo.scale * LOG2E

    def step(masked: bool):
        def body(index, dq):
            k = _key_pieces(geo, k_ref, index, keys, masked)
            v = _key_tile(geo, v_ref, index, keys, geo.dv, masked)
            p = jnp.exp2(_scores(geo, q, k) * log2_scale - lse2[:, None])
            if masked:
                p = jnp.where(_visible(rows, index * keys + jnp.arange(keys)), p, 0.0)
            ds = (p * (dot_nt(do, v, geo.precision) - delta[:, None])).astype(v.dtype)
            return tuple(acc + dot(ds, piece, geo.precision) for acc, piece in zip(dq, k, strict=True))

        return body

    first, full_lo, full_hi, last = _key_tile_ranges(rows, keys)
    dq = tuple(jnp.zeros(piece.shape, jnp.float32) for piece in q)
    dq = jax.lax.fori_loop(full_lo, full_hi, step(False), dq)
    dq = jax.lax.fori_loop(first, full_lo, step(True), dq)
    dq = jax.lax.fori_loop(full_hi, last, step(True), dq)
    for acc, (offset, _) in zip(dq, geo.dk_pieces, strict=True):
        _store_rows(dq_ref, rows, acc * geo.scale, geo.dk, offset)


def _backwards_loop(lower: jax.Array, upper: jax.Array, body, carry):
    """``body(i, carry)`` for ``i = upper - 1`` down to ``lower``.

    The dK/dV programs of a KV head all end at the last query tile; walking backwards,
    programs that run at the same time read the same query tiles, which then come from L2.
    """
    return jax.lax.fori_loop(0, upper - lower, lambda i, c: body(upper - 1 - i, c), carry)


def _dkv_kernel(
    first_ref,
    last_ref,
    starts_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    geo: _Geometry,
):
    """dK, dV of compressed key tile ``j`` (slots ``[j*keys, (j+1)*keys)``) of one KV head,
    or with ``dkv_splits = S > 1`` the float32 part of them from split ``s`` (program
    ``j * S + s``) of its query tiles.

    ``first_ref``/``last_ref [key tiles]`` hold per key tile the query tiles ``[first, last)``
    that can see one of its tokens; without segments the query tiles from
    ``full`` on see the whole key tile and skip the mask.
    """
    tuning = geo.tuning
    keys, wanted_rows, splits = tuning.dkv_keys, tuning.dkv_rows, tuning.dkv_splits
    tile_rows = geo.rows(wanted_rows)
    key_tile = jax.lax.div(pl.program_id(1), splits)
    slot = key_tile * keys + jnp.arange(keys)
    k = _key_pieces(geo, k_ref, key_tile, keys, True)
    v = _key_tile(geo, v_ref, key_tile, keys, geo.dv, True)
    first, last = first_ref[key_tile], last_ref[key_tile]
    if splits > 1:
        split = jax.lax.rem(pl.program_id(1), splits)
        span = last - first
        first, last = (
            first + jax.lax.div(split * span, splits),
            first + jax.lax.div((split + 1) * span, splits),
        )
    log2_scale = geo.scale * LOG2E

    def step(masked: bool):
        def body(index, carry):
            dk, dv = carry
            rows = _tile_rows(geo, starts_ref, index, tile_rows)
            q = _query_pieces(geo, q_ref, rows)
            do = _load_rows(do_ref, rows, geo.dv, geo.dv_padded)
            lse2 = _finite_lse2(_load_row_values(lse_ref, rows))
            delta = _load_row_values(delta_ref, rows)
            p = jnp.exp2(_scores(geo, k, q) * log2_scale - lse2[None, :])
            if masked:
                p = jnp.where(_visible_transposed(rows, slot), p, 0.0)
            dv = dv + dot(p.astype(do.dtype), do, geo.precision)
            ds = (p * (dot_nt(v, do, geo.precision) - delta[None, :])).astype(do.dtype)
            dk = tuple(acc + dot(ds, piece, geo.precision) for acc, piece in zip(dk, q, strict=True))
            return dk, dv

        return body

    carry = (
        tuple(jnp.zeros((keys, width), jnp.float32) for _, width in geo.dk_pieces),
        jnp.zeros((keys, geo.dv_padded), jnp.float32),
    )
    if geo.segmented or geo.window is not None:
        # Some rows of every query tile may not see some tokens (another segment, or
        # outside the window).
        dk, dv = _backwards_loop(first, last, step(True), carry)
    else:
        # Query tiles from this one on see every token of the key tile (their first
        # position is at or after the end of the tile's last block).
        last_slot = jnp.minimum((key_tile + 1) * keys, geo.slots) - 1
        first_full = last_slot * geo.block_stride + geo.block_length - 1
        full = jnp.clip(
            jax.lax.div(first_full + geo.positions(wanted_rows) - 1, geo.positions(wanted_rows)), first, last
        )
        carry = _backwards_loop(full, last, step(False), carry)
        dk, dv = _backwards_loop(first, full, step(True), carry)
    in_range = slot < geo.slots
    rows = pl.ds(key_tile * keys, keys)
    for acc, (offset, width) in zip(dk, geo.dk_pieces, strict=True):
        cols = lanes(min(geo.dk - offset, width), width)
        store(dk_ref.at[rows, pl.ds(offset, width)], acc * geo.scale, tile_mask(in_range, cols))
    store(dv_ref.at[rows, :], dv, tile_mask(in_range, lanes(geo.dv, geo.dv_padded)))


def _per_head(geo: _Geometry, length: int, *trailing: int) -> pl.BlockSpec:
    """Block of a whole row ``[length, ...]`` of one KV head, for grids ``(x, H, B)``."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((None, length, None, *trailing), lambda x, h, b: (b, 0, h, *zeros))


def _per_head_first(geo: _Geometry, length: int, *trailing: int) -> pl.BlockSpec:
    """:func:`_per_head` for grids ``(H, x, B)``."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((None, length, None, *trailing), lambda h, x, b: (b, 0, h, *zeros))


def _per_split_head(geo: _Geometry, length: int, width: int) -> pl.BlockSpec:
    """Block ``[length, width]`` of split ``x % dkv_splits`` of one KV head of a
    ``[B, splits, length', H, width']`` array, for the dK/dV grid ``(H, key tiles * splits, B)``."""
    splits = geo.tuning.dkv_splits
    return pl.BlockSpec(
        (None, None, length, None, width), lambda h, x, b: (b, jax.lax.rem(x, splits), 0, h, 0)
    )


def _per_batch(*shape: int) -> pl.BlockSpec:
    zeros = (0,) * len(shape)
    return pl.BlockSpec((None, *shape), lambda x, h, b: (b, *zeros))


def _forward(q, k, v, starts, geo: _Geometry):
    batch, length, heads = geo.batch, geo.length, geo.heads
    q5 = q.reshape(batch, length, heads, geo.group, geo.dk)
    gq = geo.heads_pow2
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo),
        grid=(geo.query_tiles(geo.tuning.fwd_rows), heads, batch),
        in_specs=[
            _per_batch(length),
            _per_head(geo, length, gq, geo.dk_padded),
            _per_head(geo, geo.slots_padded(geo.tuning.fwd_keys), geo.dk_padded),
            _per_head(geo, geo.slots_padded(geo.tuning.fwd_keys), geo.dv_padded),
        ],
        out_specs=[_per_head(geo, length, gq, geo.dv_padded), _per_head(geo, length, gq)],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, geo.group, geo.dv), q.dtype),
            jax.ShapeDtypeStruct((batch, length, heads, geo.group), jnp.float32),
        ],
        compiler_params=geo.params(geo.tuning.fwd_warps, geo.tuning.fwd_stages),
        interpret=geo.interpret,
        name="nsa_compressed_fwd",
    )(starts, q5, k, v)
    return out.reshape(batch, length, heads * geo.group, geo.dv), lse.reshape(batch, length, -1)


def _query_tile_ranges(starts: jax.Array, geo: _Geometry) -> tuple[jax.Array, jax.Array]:
    """int32 ``([B, key tiles], [B, key tiles])``: query tiles ``[first, last)`` that see a
    token of each key tile.

    A token starting at ``st`` is seen from position ``st + l - 1`` to the end of its
    segment (with a window, to ``st + w - 1`` at most); a key tile spans its valid tokens'
    union (empty: ``first = last = 0``).
    """
    batch, length = starts.shape
    keys = geo.tuning.dkv_keys
    tiles = geo.key_tiles(keys)
    token_start = compressed_token_starts(
        starts, geo.slots, block_length=geo.block_length, block_stride=geo.block_stride
    )
    positions = jnp.arange(length, dtype=jnp.int32)
    # Segment end of each position: the next position whose segment start differs.
    next_start = jnp.concatenate([starts[:, 1:], jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    ends = jax.lax.cummin(jnp.where(next_start != starts, positions + 1, length), axis=1, reverse=True)
    valid = token_start >= 0
    safe = jnp.maximum(token_start, 0)
    seen_from = jnp.where(valid, safe + geo.block_length - 1, length)
    seen_to = jnp.where(valid, jnp.take_along_axis(ends, safe, axis=1), 0)
    if geo.window is not None:
        seen_to = jnp.minimum(seen_to, safe + geo.window)
    pad = tiles * keys - geo.slots
    seen_from = jnp.pad(seen_from, ((0, 0), (0, pad)), constant_values=length).reshape(batch, tiles, keys)
    seen_to = jnp.pad(seen_to, ((0, 0), (0, pad))).reshape(batch, tiles, keys)
    positions_per_tile = geo.positions(geo.tuning.dkv_rows)
    last = (jnp.max(seen_to, axis=2) + positions_per_tile - 1) // positions_per_tile
    first = jnp.minimum(jnp.min(seen_from, axis=2) // positions_per_tile, last)
    return first.astype(jnp.int32), last.astype(jnp.int32)


def _backward(q, k, v, starts, out, lse, dout, dlse, geo: _Geometry):
    batch, length, heads = geo.batch, geo.length, geo.heads
    gq = geo.heads_pow2
    q5 = q.reshape(batch, length, heads, geo.group, geo.dk)
    o5 = out.reshape(batch, length, heads, geo.group, geo.dv)
    do5 = dout.reshape(batch, length, heads, geo.group, geo.dv)
    lse4 = lse.reshape(batch, length, heads, geo.group)
    dlse4 = dlse.astype(jnp.float32).reshape(batch, length, heads, geo.group)
    dq, delta = pl.pallas_call(
        functools.partial(_dq_kernel, geo=geo),
        grid=(geo.query_tiles(geo.tuning.dq_rows), heads, batch),
        in_specs=[
            _per_batch(length),
            _per_head(geo, length, gq, geo.dk_padded),
            _per_head(geo, geo.slots_padded(geo.tuning.dq_keys), geo.dk_padded),
            _per_head(geo, geo.slots_padded(geo.tuning.dq_keys), geo.dv_padded),
            _per_head(geo, length, gq, geo.dv_padded),
            _per_head(geo, length, gq, geo.dv_padded),
            _per_head(geo, length, gq),
            _per_head(geo, length, gq),
        ],
        out_specs=[_per_head(geo, length, gq, geo.dk_padded), _per_head(geo, length, gq)],
        out_shape=[
            jax.ShapeDtypeStruct(q5.shape, q.dtype),
            jax.ShapeDtypeStruct(lse4.shape, jnp.float32),
        ],
        compiler_params=geo.params(geo.tuning.dq_warps, geo.tuning.dq_stages),
        interpret=geo.interpret,
        name="nsa_compressed_dq",
    )(starts, q5, k, v, o5, do5, lse4, dlse4)
    first, last = _query_tile_ranges(starts, geo)
    tiles = geo.key_tiles(geo.tuning.dkv_keys)
    slots = geo.slots_padded(geo.tuning.dkv_keys)
    splits = geo.tuning.dkv_splits
    if splits == 1:
        out_specs = [_per_head_first(geo, slots, geo.dk_padded), _per_head_first(geo, slots, geo.dv_padded)]
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    else:
        out_specs = [_per_split_head(geo, slots, geo.dk_padded), _per_split_head(geo, slots, geo.dv_padded)]
        out_shape = [jax.ShapeDtypeStruct((batch, splits, *x.shape[1:]), jnp.float32) for x in (k, v)]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, geo=geo),
        grid=(heads, tiles * splits, batch),
        in_specs=[
            _per_batch(tiles),
            _per_batch(tiles),
            _per_batch(length),
            _per_head_first(geo, length, gq, geo.dk_padded),
            _per_head_first(geo, slots, geo.dk_padded),
            _per_head_first(geo, slots, geo.dv_padded),
            _per_head_first(geo, length, gq, geo.dv_padded),
            _per_head_first(geo, length, gq),
            _per_head_first(geo, length, gq),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=geo.params(geo.tuning.dkv_warps, geo.tuning.dkv_stages),
        interpret=geo.interpret,
        name="nsa_compressed_dkv",
    )(first, last, starts, q5, k, v, do5, lse4, delta)
    if splits > 1:
        dk, dv = dk.sum(axis=1).astype(k.dtype), dv.sum(axis=1).astype(v.dtype)
    return dq.reshape(q.shape), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, starts, geo: _Geometry):
    return _forward(q, k, v, starts, geo)


def _attention_fwd(q, k, v, starts, geo: _Geometry):
    out, lse = _forward(q, k, v, starts, geo)
    return (out, lse), (q, k, v, starts, out, lse)


def _attention_bwd(geo: _Geometry, residuals, cotangents):
    q, k, v, starts, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, starts, out, lse, dout, dlse, geo)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("block_length", "block_stride", "scale", "interpret", "tuning"))
def compressed_attention(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    scale: float,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    tuning: CompressedTuning | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Compressed attention with Pallas kernels; see :func:`nsa_jax.compressed_attention`.

    Args:
      q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]`` (slot
        layout, ``1 <= Tc <= ceil(T / d)``); one float dtype.
      block_length, block_stride: ``l`` and ``d``; scale: logit scale.
      segment_ids: int ``[B, T]`` or ``None``.
      interpret: run the kernels in Pallas interpret mode (CPU).
      tuning: tile sizes, warps and pipeline stages per kernel; ``None``:
        :func:`default_tuning` of the dtype and head dims.

    Returns:
      ``(out [B, T, HQ, Dv]`` in ``q.dtype``, ``lse`` float32 ``[B, T, HQ])``; 0 and
      ``-inf`` for a query that sees no compressed token. Differentiable in ``q``,
      ``k_cmp`` and ``v_cmp`` through both outputs.
    """
    return _banded_attention(
        q, k_cmp, v_cmp, block_length, block_stride, None, scale, segment_ids, interpret, tuning
    )


def _banded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_length: int,
    block_stride: int,
    window: int | None,
    scale: float,
    segment_ids: jax.Array | None,
    interpret: bool,
    tuning: CompressedTuning | None,
) -> tuple[jax.Array, jax.Array]:
    """The kernels over keys ``k [B, S, H, Dk]`` / ``v [B, S, H, Dv]`` as slots of width ``l``
    and stride ``d``; ``window``: only the last ``w`` slots up to each query (``l = d = 1``).
    Returns ``(out [B, T, HQ, Dv], lse [B, T, HQ])``."""
    batch, length, q_heads, dk = q.shape
    geo = _Geometry(
        batch=batch,
        length=length,
        slots=k.shape[1],
        heads=k.shape[2],
        group=q_heads // k.shape[2],
        dk=dk,
        dv=v.shape[3],
        block_length=block_length,
        block_stride=block_stride,
        scale=float(scale),
        segmented=segment_ids is not None,
        window=window,
        dtype=jnp.dtype(q.dtype).name,
        interpret=interpret,
        tuning=default_tuning(q.dtype, dk, v.shape[3]) if tuning is None else tuning,
    )
    starts = segment_starts(segment_ids, batch, length)
    return _attention(q, k, v, starts, geo)


@functools.partial(jax.jit, static_argnames=("window", "scale", "interpret", "tuning"))
def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    tuning: CompressedTuning | None = None,
) -> jax.Array:
    """Sliding-window attention with the compressed-attention kernels (``l = d = 1``, the
    raw keys as slots); arguments as :func:`nsa_jax.sliding_window_attention`.

    Args:
      q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; one float dtype.
      window: ``w``; query ``t`` sees keys ``max(s0, t - w + 1) .. t``.
      interpret, tuning: as :func:`compressed_attention`.

    Returns:
      ``[B, T, HQ, Dv]`` in ``q.dtype``.
    """
    return _banded_attention(q, k, v, 1, 1, window, scale, segment_ids, interpret, tuning)[0]


def check(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> None:
    """Raises ``ValueError`` for inputs these kernels do not serve (other dtypes, ``Tc = 0``)."""
    del v_cmp, block_length, block_stride, scale, segment_ids
    require_supported_dtype(q)
    if k_cmp.shape[1] == 0:
        raise ValueError("k_cmp must hold at least one compressed token (axis 1) for pallas_triton")


def check_window(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> None:
    """Raises ``ValueError`` for window inputs these kernels do not serve (other dtypes)."""
    del k, v, window, scale, segment_ids
    require_supported_dtype(q)
