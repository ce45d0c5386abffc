"""A window onto a whole-array ref, for kernels that pick their (sequence, KV head) at run time.

A persistent kernel (:mod:`pallas_kernels.gpu.decode_fused`) gets whole arrays, not the
blocks a ``BlockSpec`` cuts per program, and runs kernel bodies written for those blocks.
:class:`RefWindow` makes a whole-array ref look like such a block: loads, stores and
``.at`` compose the window's indices and the body's into one indexer, since the Triton
lowering takes one indexer per load or store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def _shift(index: Any, window: pl.Slice) -> Any:
    """``index`` on a window axis, as an index of the whole axis."""
    if isinstance(index, slice):
        if index != slice(None):
            raise ValueError(f"a RefWindow axis takes ':' or pl.ds, not the slice {index}")
        return window
    if isinstance(index, pl.Slice):
        return pl.ds(window.start + index.start, index.size)
    return window.start + index


class RefWindow:
    """``ref`` seen through ``index``, one entry per axis of ``ref``: a scalar (the axis
    is fixed and dropped), ``pl.ds(start, size)`` (kept, ``size`` long from ``start``) or
    ``slice(None)`` (kept whole)."""

    def __init__(self, ref: Any, index: tuple[Any, ...]):
        if len(index) != len(ref.shape):
            raise ValueError(f"index needs one entry per axis of ref {ref.shape}, got {len(index)}")
        self.ref = ref
        self.index = index

    @property
    def shape(self) -> tuple[int, ...]:
        kept = []
        for size, entry in zip(self.ref.shape, self.index, strict=True):
            if isinstance(entry, slice):
                kept.append(size)
            elif isinstance(entry, pl.Slice):
                kept.append(entry.size)
        return tuple(kept)

    @property
    def dtype(self) -> Any:
        return self.ref.dtype

    def compose(self, index: Any) -> tuple[Any, ...]:
        """The whole array's indexer for ``index`` on the window (``...`` and missing
        trailing axes mean whole window axes)."""
        index = index if isinstance(index, tuple) else (index,)
        kept = len(self.shape)
        ellipses = [i for i, entry in enumerate(index) if entry is Ellipsis]
        if ellipses:
            at = ellipses[0]
            index = (*index[:at], *(slice(None),) * (kept - len(index) + 1), *index[at + 1 :])
        index = (*index, *(slice(None),) * (kept - len(index)))
        given = iter(index)
        whole = []
        for entry in self.index:
            if isinstance(entry, slice):
                whole.append(next(given))
            elif isinstance(entry, pl.Slice):
                whole.append(_shift(next(given), entry))
            else:
                whole.append(entry)
        # Interpret mode's masked stores and atomics take no Python ints among array indices.
        return tuple(jnp.int32(entry) if isinstance(entry, int) else entry for entry in whole)

    def __getitem__(self, index: Any) -> jax.Array:
        return self.ref[self.compose(index)]

    def __setitem__(self, index: Any, value: jax.Array) -> None:
        self.ref[self.compose(index)] = value

    @property
    def at(self) -> _At:
        return _At(self)


class _At:
    def __init__(self, window: RefWindow):
        self.window = window

    def __getitem__(self, index: Any) -> Any:
        return self.window.ref.at[self.window.compose(index)]


def atomic_add_first(ref: Any, value: jax.Array) -> jax.Array:
    """Atomically adds int32 ``value`` to element 0 of ``ref`` (a ref or :class:`RefWindow`)
    and returns the old value (acquire-release, GPU scope)."""
    value = jnp.asarray(value, jnp.int32)
    if isinstance(ref, RefWindow):
        return plt.atomic_add(ref.ref, ref.compose(0), value)
    return plt.atomic_add(ref, jnp.int32(0), value)


def by_program(body: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """A ``pallas_call`` kernel that runs ``body(pl.program_id(0), *refs, **kwargs)`` (and
    drops what it returns)."""

    def kernel(*refs: Any) -> None:
        body(pl.program_id(0), *refs, **kwargs)

    return kernel
