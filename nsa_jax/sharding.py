"""Logical axis names of the layer's parameters and the rules that map them to a mesh.

The layer annotates every parameter with logical names (``nnx.with_partitioning``);
a training loop chooses the physical mesh axes with rules in the MaxText style:
``(logical name, mesh axis or axes or None)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
