"""Measurement helpers shared by the GPU checks and benchmarks (METHOD: relative error, median time)."""

from __future__ import annotations

import glob
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData


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


def gpu_events(fn, args) -> list[dict]:
    """Kernels and copies on the GPU during one call of ``fn(*args)`` (after two warm-up calls)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder):
        jax.block_until_ready(fn(*args))
    trace = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    raw = sorted(
        (event.start_ns, event.duration_ns, event.name)
        for plane in trace.planes
        if "GPU" in plane.name
        for line in plane.lines
        for event in line.events
    )
    if not raw:
        return []
    events, end = [], None
    for start, duration, name in raw:
        events.append(
            {
                "start_us": (start - raw[0][0]) / 1e3,
                "duration_us": duration / 1e3,
                "gap_us": 0.0 if end is None else (start - end) / 1e3,
                "name": name,
            }
        )
        end = start + duration
    return events
