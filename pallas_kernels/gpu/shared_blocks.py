"""Blocks that consecutive queries all select, split from each query's own (XLA, before the forward).

The selected-attention forward can run ``Q`` consecutive query positions of one KV head per
program (``SelectionTuning.fwd_queries``). A block that every one of the ``Q`` selects is then
read once and attended by all of them; the spec's selection forces the initial block and the two
local blocks into every query's top-n (Eq. 11), so those are shared by any ``Q`` positions of one
``l'`` block, and trained models' neighbouring queries share more.

Lists are multisets: a block listed twice by a query is attended twice (the reference gathers
every slot), so the shared list holds a block as many times as every query of the group lists
it, and each query keeps the rest of its occurrences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _compacted(values: jax.Array, keep: jax.Array) -> jax.Array:
    """``values [..., n]`` where ``keep``, moved to the front in slot order, ``-1`` after."""
    position = jnp.cumsum(keep.astype(jnp.int32), axis=-1) - 1
    slots = jnp.arange(values.shape[-1])
    lands = keep[..., None, :] & (position[..., None, :] == slots[:, None])
    return jnp.where(jnp.any(lands, axis=-1), jnp.sum(jnp.where(lands, values[..., None, :], 0), axis=-1), -1)


def split_shared_starts(key_starts: jax.Array, queries: int) -> tuple[jax.Array, jax.Array]:
    """Blocks shared by each group of ``queries`` consecutive positions, and each position's rest.

    Args:
      key_starts: int32 ``[B, T, H, n]``, the first key of each selected block (``-1``: none),
        as :func:`pallas_kernels.gpu.selection.selected_key_starts`.
      queries: positions per group ``Q``; groups are ``[g*Q, (g+1)*Q)``, the last one padded
        with positions that select nothing.

    Returns:
      ``(shared [B, ceil(T/Q), H, n], private [B, ceil(T/Q) * Q, H, n])``, int32, each list
      compacted (starts first, in slot order, then ``-1``). For every position, ``shared`` of
      its group plus its ``private`` is its ``key_starts`` row as a multiset.
    """
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    if key_starts.ndim != 4:
        raise ValueError(f"key_starts must be [B, T, H, n], got shape {key_starts.shape}")
    batch, length, heads, slots = key_starts.shape
    groups = -(-length // queries)
    starts = jnp.pad(key_starts, ((0, 0), (0, groups * queries - length), (0, 0), (0, 0)), constant_values=-1)
    # [B, groups, H, Q, n]
    starts = starts.reshape(batch, groups, queries, heads, slots).transpose(0, 1, 3, 2, 4)
    valid = starts >= 0
    # How often position j lists the block of slot a of position i: [..., i, a, j].
    copies = jnp.sum(starts[..., :, :, None, None] == starts[..., None, None, :, :], axis=-1)
    in_every = jnp.min(copies, axis=-1)  # [..., i, a]
    # Earlier slots of position i listing the same block: [..., i, a].
    earlier = jnp.tril(jnp.ones((slots, slots), bool), -1)  # [a, b]: b < a
    occurrence = jnp.sum((starts[..., :, None] == starts[..., None, :]) & earlier, axis=-1)
    shared = valid[..., 0, :] & (occurrence[..., 0, :] < in_every[..., 0, :])
    private = valid & (occurrence >= in_every)
    shared_starts = _compacted(starts[..., 0, :], shared)
    private_starts = _compacted(starts, private).transpose(0, 1, 3, 2, 4)
    return shared_starts, private_starts.reshape(batch, groups * queries, heads, slots)
