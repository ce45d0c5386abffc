"""The functional NSA ops: validation, then dispatch to a registered implementation.

Layout conventions (spec, "Notation"): ``q [B, T, HQ, Dk]``, keys ``[B, T, H, Dk]``,
values ``[B, T, H, Dv]``, with ``HQ = H * G`` and query head ``hq`` reading KV head
``hq // G``. Segment ids are int ``[B, T]``; a segment is a maximal run of equal ids.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import checks, cudnn, registry
from nsa_jax.reference import compressed as compressed_ref
from nsa_jax.reference import selected as selected_ref
from nsa_jax.reference import selection as selection_ref
from nsa_jax.reference import window as window_ref
from nsa_jax.segments import num_compressed_slots

Implementation = str | None

BRANCHES = ("compressed", "selected", "window")


def _attention_shapes(
    q: jax.Array, k: jax.Array, v: jax.Array, key_name: str = "k"
) -> tuple[int, int, int, int]:
    """Validates q/k/v layouts; returns (B, T, HQ, H)."""
    value_name = "v" + key_name[1:]
    checks.rank("q", q, 4, "[B, T, HQ, Dk]")
    checks.rank(key_name, k, 4, "[B, T, H, Dk]")
    checks.rank(value_name, v, 4, "[B, T, H, Dv]")
    checks.floating_same_dtype(**{"q": q, key_name: k, value_name: v})
    batch = checks.same_dim(
        "batch sizes (axis 0)", q=q.shape[0], **{key_name: k.shape[0], value_name: v.shape[0]}
    )
    checks.same_dim(f"head dims Dk of q and {key_name}", q=q.shape[3], **{key_name: k.shape[3]})
    checks.same_dim(
        f"KV heads of {key_name} and {value_name}", **{key_name: k.shape[2], value_name: v.shape[2]}
    )
    checks.query_key_heads(q.shape[2], k.shape[2])
    return batch, q.shape[1], q.shape[2], k.shape[2]


def _same_length(q: jax.Array, k: jax.Array, v: jax.Array, key_name: str = "k") -> None:
    value_name = "v" + key_name[1:]
    checks.same_dim(
        "sequence lengths (axis 1)", q=q.shape[1], **{key_name: k.shape[1], value_name: v.shape[1]}
    )


def _block_indices(block_indices: jax.Array, batch: int, length: int, kv_heads: int, block_size: int) -> None:
    checks.rank("block_indices", block_indices, 4, "[B, T, H, n]")
    checks.integer_array("block_indices", block_indices)
    if tuple(block_indices.shape[:3]) != (batch, length, kv_heads):
        raise ValueError(
            f"block_indices must have shape (B, T, H, n) with (B, T, H) = {(batch, length, kv_heads)}, "
            f"got {tuple(block_indices.shape)}"
        )
    if checks.is_concrete(block_indices) and block_indices.size:
        num_blocks = -(-length // block_size)
        # numpy, not jnp: under a jit trace jnp would stage the reduction even of a concrete
        # (closed-over) array and return a tracer.
        values = np.asarray(block_indices)
        low, high = int(values.min()), int(values.max())
        if low < -1 or high >= num_blocks:
            raise ValueError(
                f"block_indices must lie in [-1, ceil(T / block_size) - 1] = [-1, {num_blocks - 1}], "
                f"got values in [{low}, {high}]"
            )


def selected_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    *,
    block_size: int,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    implementation: Implementation = None,
) -> jax.Array:
    """Attention over the selected key blocks of each query (spec, Eq. 12).

    Args:
      q: ``[B, T, HQ, Dk]``.
      k: ``[B, T, H, Dk]``.
      v: ``[B, T, H, Dv]``.
      block_indices: int ``[B, T, H, n]``; block ``j`` covers keys
        ``[s0 + j*block_size, s0 + (j+1)*block_size)`` where ``s0`` is the start of
        the query's segment (0 without ``segment_ids``); ``-1`` marks an unused slot.
        Order does not matter. Keys after the query are masked. Values are checked
        when concrete; under ``jit`` an out-of-range block contributes nothing.
      block_size: selection block size ``l'``.
      scale: logit scale, default ``Dk ** -0.5``.
      segment_ids: int ``[B, T]`` for packed sequences.
      implementation: a name from ``implementations("selected_attention")``, or
        ``None`` for the best available.

    Returns:
      ``[B, T, HQ, Dv]`` in ``q.dtype``; 0 for a query with no valid slot.
    """
    batch, length, _, kv_heads = _attention_shapes(q, k, v)
    _same_length(q, k, v)
    block_size = checks.positive_int("block_size", block_size)
    _block_indices(block_indices, batch, length, kv_heads, block_size)
    checks.segment_ids(segment_ids, batch, length)
    scale = checks.scale(scale, q.shape[-1])
    args = (q, k, v, block_indices)
    kwargs = dict(block_size=block_size, scale=scale, segment_ids=segment_ids)
    fn = registry.resolve("selected_attention", implementation, *args, **kwargs)
    return fn(*args, **kwargs)


def _compression_geometry(block_length: int, block_stride: int) -> tuple[int, int]:
    block_length = checks.positive_int("block_length", block_length)
    block_stride = checks.positive_int("block_stride", block_stride)
    if block_length % block_stride:
        raise ValueError(
            f"block_stride must divide block_length (d | l), got l={block_length}, d={block_stride}"
        )
    return block_length, block_stride


def _compressed_keys(q: jax.Array, k_cmp: jax.Array, block_stride: int) -> None:
    slots = num_compressed_slots(q.shape[1], block_stride)
    if k_cmp.shape[1] > slots:
        raise ValueError(
            f"k_cmp must hold at most ceil(T / block_stride) = {slots} compressed tokens "
            f"(axis 1), got {k_cmp.shape[1]}"
        )


def compressed_attention(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    implementation: Implementation = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention over compressed block tokens (spec, Eqs. 7-8).

    Args:
      q: ``[B, T, HQ, Dk]``.
      k_cmp: ``[B, Tc, H, Dk]`` compressed keys in the slot layout of
        :mod:`nsa_jax.segments` (without segments: token ``i`` summarises raw keys
        ``[i*d, i*d + l)``); ``Tc <= ceil(T / d)``.
      v_cmp: ``[B, Tc, H, Dv]``.
      block_length: ``l``; block_stride: ``d`` (``d | l``).
      scale: default ``Dk ** -0.5``.
      segment_ids: int ``[B, T]``.

    Returns:
      ``(out, lse)``: ``out [B, T, HQ, Dv]`` in ``q.dtype`` (0 where no compressed
      token is visible yet), ``lse`` float32 ``[B, T, HQ]`` (``-inf`` there), which
      :func:`select_blocks` uses to rebuild ``p_cmp``.
    """
    batch, length, _, _ = _attention_shapes(q, k_cmp, v_cmp, key_name="k_cmp")
    checks.same_dim("compressed tokens (axis 1)", k_cmp=k_cmp.shape[1], v_cmp=v_cmp.shape[1])
    block_length, block_stride = _compression_geometry(block_length, block_stride)
    _compressed_keys(q, k_cmp, block_stride)
    checks.segment_ids(segment_ids, batch, length)
    scale = checks.scale(scale, q.shape[-1])
    args = (q, k_cmp, v_cmp)
    kwargs = dict(block_length=block_length, block_stride=block_stride, scale=scale, segment_ids=segment_ids)
    fn = registry.resolve("compressed_attention", implementation, *args, **kwargs)
    return fn(*args, **kwargs)


def _selection_geometry(
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
) -> dict[str, int]:
    block_length, block_stride = _compression_geometry(block_length, block_stride)
    selection_block_size = checks.positive_int("selection_block_size", selection_block_size)
    num_selected = checks.positive_int("num_selected", num_selected)
    if selection_block_size % block_stride:
        raise ValueError(
            "block_stride must divide selection_block_size (d | l'), "
            f"got l'={selection_block_size}, d={block_stride}"
        )
    if block_length > selection_block_size:
        raise ValueError(
            "block_length must not exceed selection_block_size (l <= l'), "
            f"got l={block_length}, l'={selection_block_size}"
        )
    for name, value in (("num_initial_blocks", num_initial_blocks), ("num_local_blocks", num_local_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if num_selected < num_initial_blocks + num_local_blocks:
        raise ValueError(
            f"num_selected must be at least num_initial_blocks + num_local_blocks = "
            f"{num_initial_blocks + num_local_blocks}, got {num_selected}"
        )
    return dict(
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
    )


def select_blocks(
    q: jax.Array,
    k_cmp: jax.Array,
    lse: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    implementation: Implementation = None,
) -> jax.Array:
    """The top-n selection blocks of every query and KV head (spec, Eqs. 9-11).

    ``p_cmp = exp(q . k_cmp * scale - lse)`` over visible compressed tokens; the
    importance of selection block ``j`` sums ``p_cmp`` over overlapping compressed
    tokens with the Eq. 9 weights (:func:`overlap_weights`) and over the ``G`` heads
    of each group (Eq. 10); the initial and local blocks are always chosen and the
    rest by importance, ties toward the lower index (Eq. 11). Carries no gradient.

    Args:
      q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]`` as for
        :func:`compressed_attention`; lse: float ``[B, T, HQ]`` from it.
      selection_block_size: ``l'`` (``d | l'``, ``l <= l'``).
      num_selected: ``n``, counting the forced blocks.
      num_initial_blocks, num_local_blocks: forced blocks (paper: 1 and 2, the local
        ones being the block holding ``t`` and the one before it).

    Returns:
      int32 ``[B, T, H, n]``: block numbers counted from the segment start, sorted
      ascending, ``-1`` for unused slots (fewer than ``n`` blocks visible).
    """
    checks.rank("q", q, 4, "[B, T, HQ, Dk]")
    checks.rank("k_cmp", k_cmp, 4, "[B, Tc, H, Dk]")
    checks.rank("lse", lse, 3, "[B, T, HQ]")
    checks.floating_same_dtype(q=q, k_cmp=k_cmp)
    batch, length, q_heads = q.shape[:3]
    checks.same_dim("batch sizes (axis 0)", q=batch, k_cmp=k_cmp.shape[0])
    checks.same_dim("head dims Dk", q=q.shape[3], k_cmp=k_cmp.shape[3])
    checks.query_key_heads(q_heads, k_cmp.shape[2])
    if tuple(lse.shape) != (batch, length, q_heads):
        raise ValueError(
            f"lse must have shape (B, T, HQ) = {(batch, length, q_heads)}, got {tuple(lse.shape)}"
        )
    geometry = _selection_geometry(
        block_length, block_stride, selection_block_size, num_selected, num_initial_blocks, num_local_blocks
    )
    _compressed_keys(q, k_cmp, geometry["block_stride"])
    checks.segment_ids(segment_ids, batch, length)
    kwargs = dict(geometry, scale=checks.scale(scale, q.shape[-1]), segment_ids=segment_ids)
    args = (q, k_cmp, lse.astype(jnp.float32))
    fn = registry.resolve("select_blocks", implementation, *args, **kwargs)
    return fn(*args, **kwargs)


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    implementation: Implementation = None,
) -> jax.Array:
    """Causal attention over the last ``window`` keys, the query's own included.

    Args:
      q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
      window: ``w``; query ``t`` sees keys ``max(s0, t - w + 1) .. t``.
      scale: default ``Dk ** -0.5``; segment_ids: int ``[B, T]``.

    Returns:
      ``[B, T, HQ, Dv]`` in ``q.dtype``.
    """
    batch, length, _, _ = _attention_shapes(q, k, v)
    _same_length(q, k, v)
    window = checks.positive_int("window", window)
    checks.segment_ids(segment_ids, batch, length)
    scale = checks.scale(scale, q.shape[-1])
    args = (q, k, v)
    kwargs = dict(window=window, scale=scale, segment_ids=segment_ids)
    fn = registry.resolve("sliding_window_attention", implementation, *args, **kwargs)
    return fn(*args, **kwargs)


def _branch_implementation(
    implementation: Implementation | Mapping[str, Implementation], op: str
) -> Implementation:
    if implementation is None or isinstance(implementation, str):
        return implementation
    unknown = set(implementation) - set(registry.OPS)
    if unknown:
        raise ValueError(f"implementation keys must be op names {registry.OPS}, got {sorted(unknown)}")
    return implementation.get(op)


def nsa_attention(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    k_slc: jax.Array,
    v_slc: jax.Array,
    k_win: jax.Array,
    v_win: jax.Array,
    gates: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    window: int,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    implementation: Implementation | Mapping[str, Implementation] = None,
    branches: tuple[str, ...] = BRANCHES,
) -> jax.Array:
    """The three gated branches of NSA (spec, Eq. 5).

    Args:
      q: ``[B, T, HQ, Dk]``, shared by the branches.
      k_cmp, v_cmp: compressed keys/values ``[B, Tc, H, Dk|Dv]`` (slot layout).
      k_slc, v_slc: raw keys/values of the selection branch ``[B, T, H, Dk|Dv]``.
      k_win, v_win: raw keys/values of the window branch ``[B, T, H, Dk|Dv]``.
      gates: ``[B, T, HQ, 3]`` gate values for (compressed, selected, window), each
        in [0, 1] (the layer uses a sigmoid).
      implementation: one name for every branch op, or a mapping from op name
        (``"compressed_attention"``, ``"select_blocks"``, ``"selected_attention"``,
        ``"sliding_window_attention"``) to a name; missing ops use ``None``.
      branches: the branches that contribute, for ablations; a branch left out
        contributes 0 and is not computed (selection still uses the compression
        scores when ``"compressed"`` is left out).

    Returns:
      ``[B, T, HQ, Dv]`` in ``q.dtype``.
    """
    checks.rank("gates", gates, 4, "[B, T, HQ, 3]")
    if tuple(gates.shape) != (*q.shape[:3], 3):
        raise ValueError(
            f"gates must have shape (B, T, HQ, 3) = {(*q.shape[:3], 3)}, got {tuple(gates.shape)}"
        )
    geometry = _selection_geometry(
        block_length, block_stride, selection_block_size, num_selected, num_initial_blocks, num_local_blocks
    )
    if not branches or set(branches) - set(BRANCHES):
        raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {branches!r}")
    zeros = jnp.zeros((*q.shape[:3], v_slc.shape[-1]), q.dtype)
    compressed_out, lse = compressed_attention(
        q,
        k_cmp,
        v_cmp,
        block_length=block_length,
        block_stride=block_stride,
        scale=scale,
        segment_ids=segment_ids,
        implementation=_branch_implementation(implementation, "compressed_attention"),
    )
    selected_out = window_out = zeros
    if "selected" in branches:
        block_indices = select_blocks(
            q,
            k_cmp,
            lse,
            **geometry,
            scale=scale,
            segment_ids=segment_ids,
            implementation=_branch_implementation(implementation, "select_blocks"),
        )
        selected_out = selected_attention(
            q,
            k_slc,
            v_slc,
            block_indices,
            block_size=selection_block_size,
            scale=scale,
            segment_ids=segment_ids,
            implementation=_branch_implementation(implementation, "selected_attention"),
        )
    if "window" in branches:
        window_out = sliding_window_attention(
            q,
            k_win,
            v_win,
            window=window,
            scale=scale,
            segment_ids=segment_ids,
            implementation=_branch_implementation(implementation, "sliding_window_attention"),
        )
    if "compressed" not in branches:
        compressed_out = zeros
    return combine_branches(gates, compressed_out, selected_out, window_out)


def combine_branches(
    gates: jax.Array, compressed_out: jax.Array, selected_out: jax.Array, window_out: jax.Array
) -> jax.Array:
    """Eq. 5: ``gates [..., HQ, 3]`` times branch outputs ``[..., HQ, Dv]``, summed.

    Computed in at least float32; returned in the branch outputs' dtype.
    """
    wide = jnp.promote_types(compressed_out.dtype, jnp.float32)
    gates = gates.astype(wide)
    combined = (
        gates[..., 0:1] * compressed_out.astype(wide)
        + gates[..., 1:2] * selected_out.astype(wide)
        + gates[..., 2:3] * window_out.astype(wide)
    )
    return combined.astype(compressed_out.dtype)


# The pure-JAX references, on every backend and below every kernel.
registry.register_all(
    "xla",
    ("cpu", "gpu", "tpu"),
    (
        ("selected_attention", selected_ref.selected_attention, None, 0),
        ("compressed_attention", compressed_ref.compressed_attention, None, 0),
        ("select_blocks", selection_ref.select_blocks, None, 0),
        ("sliding_window_attention", window_ref.sliding_window_attention, None, 0),
    ),
)

# (op, cuDNN implementation, its check, priority); GPU only, not interpretable.
_CUDNN_IMPLEMENTATIONS = (
    # Default on GPU where it serves (bf16/f16, unpacked). On the H200 at T=16K, Dk=192/Dv=128,
    # one run: 1.4 / 5.9 ms forward / forward+backward against the xla window's 18.3 / 99.7
    # (experiments/results/layer_h200.md, session 4).
    ("sliding_window_attention", cudnn.sliding_window_attention, cudnn.check, 5),
    # Above the Pallas kernel (10) where it serves (bf16/f16, unpacked). On the H200 at T=64K,
    # paper config: 11.5 / 46.2 ms forward / forward+backward at Dk=192/Dv=128 and 9.2 / 34.2
    # at Dk=Dv=128, against the Pallas kernel's 14.7 / 68.1 and 12.0 / 47.4
    # (experiments/results/compression_h200.md).
    ("compressed_attention", cudnn.compressed_attention, cudnn.check_compressed, 20),
)


registry.register_all("cudnn", ("gpu",), _CUDNN_IMPLEMENTATIONS)
