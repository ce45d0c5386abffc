"""The NSA ops under a device mesh: ``jax.shard_map`` over batch and heads.

Every NSA branch is independent across batch rows and across KV-head groups (a
query head only reads its own KV head, and selection sums importance only inside a
group), so sharding batch over the data-parallel axes and KV heads over the tensor
axis needs no communication. Query heads follow their KV heads: with ``HQ = H * G``
and query head ``hq`` reading KV head ``hq // G``, splitting both head axes into the
same number of contiguous shards keeps every group on one device.

Usage::

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    ops = sharded_ops(mesh)
    out = ops.selected_attention(q, k, v, block_indices, block_size=64, segment_ids=seg)

Inside each shard the ordinary op runs (validation, then the registry picks the
implementation: ``"pallas_tpu"`` on TPU by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

import nsa_jax


@dataclasses.dataclass(frozen=True)
class ShardedOps:
    """Shard-mapped versions of the functional ops, same signatures as :mod:`nsa_jax.ops`."""

    selected_attention: Callable[..., jax.Array]
    compressed_attention: Callable[..., tuple[jax.Array, jax.Array]]
    sliding_window_attention: Callable[..., jax.Array]
    select_blocks: Callable[..., jax.Array]


def _axes(mesh: Mesh, names: Sequence[str] | str | None) -> Any:
    if names is None:
        return None
    names = (names,) if isinstance(names, str) else tuple(names)
    kept = tuple(name for name in names if name in mesh.axis_names)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else kept


def _shard(
    op: Callable[..., Any],
    mesh: Mesh,
    array_specs: tuple[PartitionSpec, ...],
    out_specs: Any,
    segment_spec: PartitionSpec,
) -> Callable[..., Any]:
    def call(*arrays: jax.Array, segment_ids: jax.Array | None = None, **kwargs: Any) -> Any:
        if len(arrays) != len(array_specs):
            raise ValueError(f"expected {len(array_specs)} array arguments, got {len(arrays)}")
        has_segments = segment_ids is not None

        def body(*shards: jax.Array) -> Any:
            segments = shards[-1] if has_segments else None
            count = len(shards) - 1 if has_segments else len(shards)
            return op(*shards[:count], segment_ids=segments, **kwargs)

        specs = array_specs + ((segment_spec,) if has_segments else ())
        operands = arrays + ((segment_ids,) if has_segments else ())
        # check_vma=False: pallas_call does not declare how its outputs vary over the mesh.
        mapped = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)
        return mapped(*operands)

    return call


def sharded_ops(
    mesh: Mesh,
    *,
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
    head_axis: str | None = "tensor",
) -> ShardedOps:
    """Shard-mapped ops for ``mesh``.

    Args:
      mesh: the device mesh; axis names it lacks are ignored.
      batch_axes: mesh axes that shard the batch (default ``("data", "fsdp")``).
      head_axis: mesh axis that shards KV heads, and with them the query heads
        (default ``"tensor"``). ``H`` and ``B`` must divide by the axis sizes.

    Returns:
      :class:`ShardedOps`; each takes the op's arguments (``implementation`` too)
      and returns globally shaped arrays.
    """
    batch = _axes(mesh, batch_axes)
    heads = _axes(mesh, head_axis)
    per_head = PartitionSpec(batch, None, heads, None)  # [B, T, heads, D] and [B, T, H, n]
    per_query = PartitionSpec(batch, None, heads)  # [B, T, HQ]
    segments = PartitionSpec(batch, None)
    return ShardedOps(
        selected_attention=_shard(nsa_jax.selected_attention, mesh, (per_head,) * 4, per_head, segments),
        compressed_attention=_shard(
            nsa_jax.compressed_attention, mesh, (per_head,) * 3, (per_head, per_query), segments
        ),
        sliding_window_attention=_shard(
            nsa_jax.sliding_window_attention, mesh, (per_head,) * 3, per_head, segments
        ),
        select_blocks=_shard(
            nsa_jax.select_blocks, mesh, (per_head, per_head, per_query), per_head, segments
        ),
    )
