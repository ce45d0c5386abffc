"""Measurement helpers shared by the GPU checks and benchmarks (METHOD: relative error, median time)."""

from __future__ import annotations

import glob
import json
import pathlib
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


def write_report(out: str | pathlib.Path, stem: str, report: dict, markdown: str) -> None:
    """Writes ``stem.json`` (the report) and ``stem.md`` into the folder ``out`` (made if missing),
    then prints the Markdown."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


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


def alternating_rounds(
    calls: dict[str, tuple[Callable, tuple]], rounds: int, iters: int
) -> dict[str, list[float]]:
    """:func:`time_jax` of every ``fn(*args)`` in ``calls``, ``rounds`` times, as ``{name: [ms per
    round]}``. A round takes the calls in turn, every other round in reverse order (A B, B A, ...),
    so that a drift of the GPU's clock over the run reaches every call alike. Each call runs once
    before the first round (compiling it); each timing has one warm-up call."""
    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be >= 1, got rounds={rounds}, iters={iters}")
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    order = list(calls)
    times: dict[str, list[float]] = {name: [] for name in order}
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            fn, args = calls[name]
            times[name].append(time_jax(fn, *args, iters=iters, warmup=1))
    return times


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


# Gaps longer than this between kernels point at host-driven work (session 11: a while loop).
LARGE_GAP_US = 5.0


def kernel_kind(name: str) -> str:
    """``"nsa"`` (this project's Pallas kernels), ``"cudnn"``, or ``"xla"`` (fusions, copies,
    sorts and every other kernel XLA launches): the glue a timeline is read for."""
    if name.startswith("nsa_"):
        return "nsa"
    return "cudnn" if "cudnn" in name else "xla"


def print_timeline(events: list[dict], min_us: float) -> dict:
    """Prints every event of ``gpu_events`` of at least ``min_us`` with the gap before it, then
    the span, the kernels' total by :func:`kernel_kind` and the gaps over ``LARGE_GAP_US``;
    returns those totals (microseconds)."""
    if not events:
        print("no GPU events (not on a GPU)")
        return {}
    for event in events:
        if event["duration_us"] >= min_us:
            print(f"{event['duration_us']:10.1f} us  gap {event['gap_us']:6.1f}  {event['name'][:100]}")
    by_kind: dict[str, float] = {}
    for event in events:
        kind = kernel_kind(event["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + event["duration_us"]
    gaps = [event["gap_us"] for event in events if event["gap_us"] > LARGE_GAP_US]
    totals = {
        "span_us": events[-1]["start_us"] + events[-1]["duration_us"],
        "busy_us": sum(by_kind.values()),
        "by_kind_us": by_kind,
        "large_gaps": len(gaps),
        "large_gaps_us": sum(gaps),
    }
    kinds = ", ".join(f"{kind} {us:.0f}" for kind, us in sorted(by_kind.items()))
    print(
        f"span {totals['span_us']:.0f} us, kernels {totals['busy_us']:.0f} us ({kinds}), {len(events)} events"
    )
    print(f"{len(gaps)} gaps over {LARGE_GAP_US:.0f} us, {totals['large_gaps_us']:.0f} us in all")
    return totals


def report_timeline(
    events: list[dict], min_us: float, out: pathlib.Path | None, filename: str, settings: dict
) -> None:
    """:func:`print_timeline`, then (with ``out``) ``out / filename``: the run's ``settings``,
    the totals and every event, as JSON."""
    totals = print_timeline(events, min_us)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / filename).write_text(json.dumps({**settings, **totals, "events": events}, indent=1))
