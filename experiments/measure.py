"""Measurement helpers shared by the GPU checks and benchmarks (METHOD: relative error, median time)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def relative_error(x: jax.Array, ref: jax.Array) -> float:
    """``||x - ref|| / ||ref||`` in float32."""
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def time_jax(fn: Callable, *args, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of ``iters`` calls of ``fn(*args)`` after ``warmup`` calls, each
    call waited for with ``block_until_ready``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
