"""Sharding: logical axis rules for the layer's parameters, and the NSA ops per shard.

The layer annotates every parameter with logical names (``nnx.with_partitioning``);
a training loop chooses the physical mesh axes with rules in the MaxText style:
``(logical name, mesh axis or axes or None)``.

The attention ops run per shard through ``jax.shard_map`` (:func:`sharded_ops`). Every
NSA branch is independent across batch rows and across KV-head groups (a query head
only reads its own KV head, and selection sums importance only inside a group), so
sharding batch over the data-parallel axes and KV heads over the tensor axis needs no
communication. Query heads follow their KV heads: with ``HQ = H * G`` and query head
``hq`` reading KV head ``hq // G``, splitting both head axes into the same number of
contiguous shards keeps every group on one device. Pallas kernels and cuDNN calls have
no partitioning rule of their own, so without the ``shard_map`` XLA would gather the
whole batch onto every device and repeat the attention there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from nsa_jax import ops

# Mesh axes: "data" (pure data parallel), "fsdp" (data parallel with sharded
# parameters), "tensor" (heads and MLP hidden units).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("branch", None),
    ("block", None),
)


def lazy_sharding() -> contextlib.AbstractContextManager:
    """Context in which new parameters record logical names without being placed.

    Modules built inside it construct with or without a mesh; place them afterwards
    with :func:`parameter_shardings`. (Older Flax never places eagerly.)
    """
    use_eager_sharding = getattr(nnx, "use_eager_sharding", None)
    return contextlib.nullcontext() if use_eager_sharding is None else use_eager_sharding(False)


def logical_to_mesh_axes(
    names: Sequence[str | None],
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_AXIS_RULES,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """``PartitionSpec`` for logical ``names``.

    Mesh axes absent from ``mesh`` are dropped, and so is a mesh axis already used
    by an earlier dimension of the same array.

    Raises:
      ValueError: a name has no rule.
    """
    table = dict(rules)
    spec: list[str | tuple[str, ...] | None] = []
    used: set[str] = set()
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"names: logical axis {name!r} has no rule in {sorted(table)}")
        axes = table[name]
        candidates = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        # A mesh axis shards at most one dimension: the first dimension that asks wins.
        kept = tuple(a for a in candidates if a not in used and (mesh is None or a in mesh.axis_names))
        used.update(kept)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    return PartitionSpec(*spec)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axis names a parameter was annotated with (``None`` per axis if none).

    Flax has stored them as ``out_sharding``, ``sharding_names`` and ``sharding``.
    """
    metadata = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if metadata.get(key):
            return tuple(metadata[key])
    return (None,) * variable.get_value().ndim


def parameter_shardings(
    state: nnx.State,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_AXIS_RULES,
) -> nnx.State:
    """``NamedSharding`` for every variable of ``state`` from its logical names.

    Variables without names (optimizer counters) are replicated, and so is any
    dimension that its mesh axes do not divide evenly.
    """

    def sharding(variable: nnx.Variable) -> NamedSharding:
        spec = logical_to_mesh_axes(logical_names(variable), rules, mesh)
        shape = variable.get_value().shape
        # A dimension the mesh axes do not divide stays whole (replicated).
        fitted = [
            axes
            if axes is None
            or shape[dim] % math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            == 0
            else None
            for dim, axes in enumerate(spec)
        ]
        return NamedSharding(mesh, PartitionSpec(*fitted))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class ShardedOps:
    """Shard-mapped versions of the functional ops, same signatures as :mod:`nsa_jax.ops`."""

    nsa_attention: Callable[..., jax.Array]
    selected_attention: Callable[..., jax.Array]
    compressed_attention: Callable[..., tuple[jax.Array, jax.Array]]
    sliding_window_attention: Callable[..., jax.Array]
    select_blocks: Callable[..., jax.Array]


def _axes(mesh: Mesh | AbstractMesh, names: Sequence[str] | str | None, size: int | None) -> Any:
    """The axes of ``names`` that ``mesh`` has, or ``None`` when none or when their product
    does not divide ``size`` (``None``: do not check)."""
    if names is None:
        return None
    names = (names,) if isinstance(names, str) else tuple(names)
    kept = tuple(name for name in names if name in mesh.axis_names)
    if not kept or (size is not None and size % math.prod(mesh.shape[name] for name in kept)):
        return None
    return kept[0] if len(kept) == 1 else kept


def _shard(
    op: Callable[..., Any],
    mesh: Mesh | AbstractMesh,
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
    mesh: Mesh | AbstractMesh,
    *,
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
    head_axis: str | None = "tensor",
    batch: int | None = None,
    kv_heads: int | None = None,
) -> ShardedOps:
    """Shard-mapped ops for ``mesh``.

    Args:
      mesh: the device mesh (concrete, or the abstract one of ``jax.set_mesh``); axis
        names it lacks are ignored.
      batch_axes: mesh axes that shard the batch (default ``("data", "fsdp")``).
      head_axis: mesh axis that shards KV heads, and with them the query heads
        (default ``"tensor"``).
      batch, kv_heads: ``B`` and ``H`` when known; an axis group whose size does not
        divide them is left out (that dimension is replicated, as
        :func:`parameter_shardings` does for parameters). Without them ``B`` and ``H``
        must divide by the axis sizes.

    Returns:
      :class:`ShardedOps`; each takes the op's arguments (``implementation`` too)
      and returns globally shaped arrays.
    """
    rows = _axes(mesh, batch_axes, batch)
    heads = _axes(mesh, head_axis, kv_heads)
    per_head = PartitionSpec(rows, None, heads, None)  # [B, T, heads, D], [B, T, H, n], gates
    per_query = PartitionSpec(rows, None, heads)  # [B, T, HQ]
    segments = PartitionSpec(rows, None)
    return ShardedOps(
        nsa_attention=_shard(ops.nsa_attention, mesh, (per_head,) * 8, per_head, segments),
        selected_attention=_shard(ops.selected_attention, mesh, (per_head,) * 4, per_head, segments),
        compressed_attention=_shard(
            ops.compressed_attention, mesh, (per_head,) * 3, (per_head, per_query), segments
        ),
        sliding_window_attention=_shard(
            ops.sliding_window_attention, mesh, (per_head,) * 3, per_head, segments
        ),
        select_blocks=_shard(ops.select_blocks, mesh, (per_head, per_head, per_query), per_head, segments),
    )


def context_mesh() -> AbstractMesh | None:
    """The mesh set with ``jax.set_mesh``, or ``None`` outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh
