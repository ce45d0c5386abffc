"""Registry of implementations behind each functional op.

Every op in :mod:`nsa_jax.ops` has a pure-JAX reference registered as ``"xla"``.
Pallas kernels (package ``pallas_kernels``) register themselves under the same op
names. ``implementation=None`` picks the highest-priority implementation that runs
natively on the current backend and accepts the given shapes; a name picks that
implementation or raises. A Pallas implementation asked for by name on a backend it
does not compile for runs in interpret mode, so every implementation is testable on
CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax

OPS = (
    "selected_attention",
    "compressed_attention",
    "select_blocks",
    "sliding_window_attention",
    "decode_selected_window",
    "decode_compressed_selection",
    "decode_step",
)

# Modules that register implementations on import. Imported lazily, on the first
# lookup, because they import nsa_jax themselves.
_PLUGIN_MODULES = ("pallas_kernels",)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One registered implementation of an op.

    Attributes:
      op: op name, one of ``OPS``.
      name: implementation name (``"xla"``, ``"pallas_triton"``, ...).
      fn: callable with the op's signature; Pallas ones also take ``interpret``.
      platforms: backends it compiles for natively (``"cpu"``, ``"gpu"``, ``"tpu"``).
      priority: higher wins when ``implementation=None``.
      interpretable: whether it can run in Pallas interpret mode elsewhere.
      check: raises ``ValueError`` naming the argument when it cannot serve the
        given arguments; called with the op's arguments.
    """

    op: str
    name: str
    fn: Callable[..., Any]
    platforms: tuple[str, ...]
    priority: int = 0
    interpretable: bool = False
    check: Callable[..., None] | None = None


_REGISTRY: dict[str, dict[str, Implementation]] = {op: {} for op in OPS}
_plugins_loaded = False


def register(impl: Implementation) -> None:
    """Registers ``impl`` under ``impl.op``; a second registration of a name replaces it."""
    if impl.op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {impl.op!r}")
    _REGISTRY[impl.op][impl.name] = impl


def register_all(
    name: str,
    platforms: tuple[str, ...],
    entries: tuple[tuple[str, Callable[..., Any], Callable[..., None] | None, int], ...],
    *,
    interpretable: bool = False,
) -> None:
    """Registers one backend's implementations, all named ``name``: ``entries`` holds
    ``(op, fn, check or None, priority)``."""
    for op, fn, check, priority in entries:
        register(
            Implementation(
                op=op,
                name=name,
                fn=fn,
                platforms=platforms,
                priority=priority,
                interpretable=interpretable,
                check=check,
            )
        )


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def implementations(op: str) -> tuple[str, ...]:
    """Names registered for ``op``, best first."""
    _load_plugins()
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    ranked = sorted(_REGISTRY[op].values(), key=lambda impl: -impl.priority)
    return tuple(impl.name for impl in ranked)


def get(op: str, name: str) -> Implementation:
    """The implementation registered as ``name`` for ``op``."""
    _load_plugins()
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if name not in _REGISTRY[op]:
        raise ValueError(f"implementation must be one of {implementations(op)} for {op}, got {name!r}")
    return _REGISTRY[op][name]


def default(op: str, *args: Any, **kwargs: Any) -> str:
    """Name of the implementation that ``implementation=None`` picks for these arguments
    (the op's validated arguments, as :func:`resolve` receives them) on this backend."""
    _load_plugins()
    return _default(op, jax.default_backend(), *args, **kwargs).name


def _default(op: str, backend: str, *args: Any, **kwargs: Any) -> Implementation:
    for impl in sorted(_REGISTRY[op].values(), key=lambda impl: -impl.priority):
        if backend not in impl.platforms:
            continue
        if impl.check is not None:
            try:
                impl.check(*args, **kwargs)
            except ValueError:
                continue
        return impl
    raise ValueError(f"no implementation of {op} serves these arguments on {backend}")


def resolve(op: str, implementation: str | None, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """Returns the callable that serves ``op`` for these arguments.

    Raises:
      ValueError: ``implementation`` is not registered for ``op``, or it cannot serve
        these arguments (its ``check`` says why), or it neither runs on this backend
        nor can be interpreted.
    """
    _load_plugins()
    backend = jax.default_backend()
    if implementation is None:
        return _bind(_default(op, backend, *args, **kwargs), backend)
    impl = get(op, implementation)
    if backend not in impl.platforms and not impl.interpretable:
        raise ValueError(
            f"implementation {implementation!r} of {op} runs on {impl.platforms}, "
            f"not on the {backend} backend"
        )
    if impl.check is not None:
        impl.check(*args, **kwargs)
    return _bind(impl, backend)


def _bind(impl: Implementation, backend: str) -> Callable[..., Any]:
    if not impl.interpretable:
        return impl.fn
    interpret = backend not in impl.platforms

    def call(*args: Any, **kwargs: Any) -> Any:
        return impl.fn(*args, interpret=interpret, **kwargs)

    return call
