"""Decode-step latency: NSA attention against dense attention, one run.

    # on the GPU: correctness at B=1 and 16, new vs prev step and cuDNN at 32K and 64K (both
    # head dims), the per-kernel split and the launch variants at B=16, 64K (~3.5 min at 24
    # steps; without --paths prev and --tune, 90 s at the default 96 steps)
    PYTHONPATH=$PWD python3 experiments/bench_decode.py --batches 1,16 --lengths 32768,65536 \
        --paths new,prev --dense cudnn --tune --out $OUT
    PYTHONPATH=$PWD python3 experiments/bench_decode.py --out $OUT          # 8K-64K
    python experiments/bench_decode.py --quick                              # tiny sizes, any backend

One step = one query token per sequence against a cache of ``S`` tokens (bf16, HQ=64,
H=4, paper geometry l=32, d=16, l'=64, n=16, w=512). NSA paths, each one step of
:func:`nsa_jax.decoding.decode_attention` (the op ``decode_step``) or of its two parts' ops:

- ``new``: the defaults for the backend (on GPU the ``pallas_triton`` whole step in two
  launches: compressed attention and the Eq. 9 sums in kernel 1, then one kernel whose
  selected-block programs score the row's blocks, pick the top n and read them while its
  window programs merge the compressed output and read the window; kernel 1 zeroes its
  counters);
- ``prev``: the two ops' ``pallas_triton`` kernels in sequence, the whole step before
  session 21: kernels 1 and 2 (the merge, scores and top-n split over several programs per
  (sequence, KV head), the last one picking), then the selected + window reads (kernel 3,
  which merges its own partials, its counters zeroed by XLA);
- ``old``: compressed attention and selection in XLA, the selected + window reads by
  the default kernel;
- ``xla``: the step in XLA (the reference of the correctness check; timed only when
  ``--paths`` names it).

Dense: ``jax.nn.dot_product_attention`` on a ``[B, S, H, 128]`` cache with cuDNN and
with XLA; and, for NSA head dims other than 128/128 (the paper's Dk=192/Dv=128), cuDNN on a
cache with those head dims (its ``Dv != Dk`` path), the dense model of the same shapes.

Correctness first: every NSA path against ``xla`` on the same random inputs (relative
error of each branch, block indices of ``new`` equal to ``xla``'s; a differing row is
reported with the reference importance gap of the blocks it swapped, a near-tie when
tiny); a failure is printed at once, timing goes on, and the run exits non-zero at
the end. Timing: one jitted ``fori_loop`` runs ``--steps`` steps back to back with no host
sync between them (each step feeds the next through its query, so nothing is hoisted: the
next query is this one negated plus zero times one element of each output, one or two small
XLA fusions a step; before session 20 the outputs were summed into a sink, three a step);
when one input set's bytes could stay in L2, the steps cycle through up to ``MAX_SETS`` sets.
Per-step time = call time / steps, median over ``--repeats`` calls after a warm-up call.
``--tune`` then times, at the largest B and S, kernel 1 alone under other launches, and the
whole step with the fastest of them under other launches of its second kernel (each checked
against ``xla`` first).
Bytes per step are counted from the shapes: every key/value element a step must read,
once; ``new`` also writes and reads its float32 Eq. 9 block sums (kernel 1 to its second
kernel).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.measure import relative_error
from nsa_jax import registry
from nsa_jax.decoding import NSACache, decode_attention
from nsa_jax.reference.compressed import attend_compressed, compression_probabilities
from nsa_jax.reference.selection import block_importance
from nsa_jax.segments import num_compressed_slots

PAPER = dict(block_length=32, block_stride=16, selection_block_size=64, num_selected=16, window=512)
HEADS, KV_HEADS, DENSE_DIM = 64, 4, 128
# Bytes the input sets of one timed loop should span so that L2 (50 MB on an H200) cannot hold them.
ROTATION_BYTES = 200e6
MAX_SETS = 4
PATHS = ("new", "prev", "old", "xla")
# Seconds of calls before a timing. One warm-up call (9 ms of an NSA step's loop) was not enough
# after the GPU sat idle while the step compiled: interleaved rounds ran their first round
# 2-4 us a step slower, and the path timed first after a compile read slower than in A/B scripts
# (session 21, results/session21_h200.md).
WARMUP_S = 0.5
# Relative-error bound of a bf16 path against the xla path.
TOLERANCE = 1e-2
# Reference-importance gap below which differing block indices count as a near-tie.
NEAR_TIE = 1e-4


def nsa_step(path: str):
    """``fn(q, cache) -> (compressed, selected, window)`` of one NSA path."""
    if path == "new":
        return functools.partial(decode_attention, **PAPER)
    if path == "xla":
        return functools.partial(decode_attention, **PAPER, implementation="xla")
    if path not in ("prev", "old"):
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    # prev: both ops' defaults (pallas_triton on GPU); old: the selection in XLA.
    selection = None if path == "prev" else "xla"

    def two_ops(q, cache):
        scale = q.shape[-1] ** -0.5
        args = (q, cache.k_cmp, cache.v_cmp, cache.lengths)
        kwargs = selection_kwargs(q.shape[-1])
        compressed, indices = registry.resolve("decode_compressed_selection", selection, *args, **kwargs)(
            *args, **kwargs
        )
        args = (q, indices, cache.keys, cache.values, cache.lengths)
        kwargs = dict(block_size=PAPER["selection_block_size"], window=PAPER["window"], scale=scale)
        return (
            compressed,
            *registry.resolve("decode_selected_window", None, *args, **kwargs)(*args, **kwargs),
        )

    return two_ops


def dense_step(impl: str, dk: int, dv: int):
    """``fn(q [B, 1, HQ, Dk], k [B, S, H, Dk], v [B, S, H, Dv]) -> (out,)``: dense decode.
    ``Dk == Dv`` goes through ``jax.nn.dot_product_attention``, which takes no other; other head
    dims through cuDNN's own ``Dv != Dk`` path (jax's cuDNN module, as
    :mod:`nsa_jax.cudnn` and ``bench_layer.py``'s matching dense peer)."""
    if dk == dv:
        return lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, implementation=impl),)
    if impl != "cudnn":
        raise ValueError(f"dense decode with Dk != Dv is timed with cudnn only, got {impl!r}")
    from jax._src.cudnn import fused_attention_stablehlo as fused_attention

    return lambda q, k, v: (
        fused_attention.dot_product_attention(
            q, k, v, scale=dk**-0.5, mask_type=fused_attention.MaskType.NO_MASK, qkv_layout="BTNH"
        ),
    )


def selection_kwargs(dk: int) -> dict:
    return dict(
        block_length=PAPER["block_length"],
        block_stride=PAPER["block_stride"],
        selection_block_size=PAPER["selection_block_size"],
        num_selected=PAPER["num_selected"],
        num_initial_blocks=1,
        num_local_blocks=2,
        scale=dk**-0.5,
    )


def looped(step, num_sets: int, steps: int):
    """Jitted ``fn(q, sets) -> q``: ``steps`` calls of ``step(q, set)`` in one ``fori_loop``,
    cycling through the ``num_sets`` input sets; returns ``(fn, steps actually run)``.

    Each step's query is the previous one negated plus zero times one element of each of its
    outputs: the steps form a chain (none can be hoisted out of the loop, no output dropped),
    and their bookkeeping is small XLA fusions, the same for every step timed."""
    iterations = -(-steps // num_sets)

    @jax.jit
    def run(q, sets):
        def body(_, q):
            for inputs in sets:
                outputs = step(q, *inputs)
                touched = sum(o.reshape(-1)[0].astype(jnp.float32) for o in outputs)
                q = (0.0 * touched - q.astype(jnp.float32)).astype(q.dtype)
            return q

        return jax.lax.fori_loop(0, iterations, body, q)

    return run, iterations * num_sets


def time_loop(fn, args, steps: int, repeats: int) -> float:
    """Median milliseconds per step over ``repeats`` calls, after a first call (which compiles)
    and warm-up calls for ``WARMUP_S`` seconds."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    while time.perf_counter() - start < WARMUP_S:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(times)


def sets_for(step_bytes: float) -> int:
    return int(min(MAX_SETS, max(1, -(-ROTATION_BYTES // step_bytes))))


def nsa_bytes(batch: int, length: int, dk: int, dv: int) -> int:
    cmp = (length - PAPER["block_length"]) // PAPER["block_stride"] + 1
    selected = min(length, PAPER["num_selected"] * PAPER["selection_block_size"])
    tokens = cmp + selected + min(length, PAPER["window"])
    return batch * KV_HEADS * tokens * (dk + dv) * 2


def block_sums_bytes(batch: int, length: int) -> int:
    """The ``new`` path's float32 Eq. 9 sums (one per query head and selection block,
    :mod:`pallas_kernels.gpu.decode_step`), written once and read once."""
    ratio = PAPER["selection_block_size"] // PAPER["block_stride"]
    blocks = -(-num_compressed_slots(length, PAPER["block_stride"]) // ratio)
    return 2 * batch * HEADS * blocks * 4


@functools.partial(jax.jit, static_argnames=("batch", "length", "dk", "dv"))
def random_cache(key, *, batch: int, length: int, dk: int, dv: int) -> NSACache:
    keys = jax.random.split(key, 4)
    slots = num_compressed_slots(length, PAPER["block_stride"])
    dtype = jnp.bfloat16
    return NSACache(
        keys=jax.random.normal(keys[0], (3, batch, length, KV_HEADS, dk), dtype),
        values=jax.random.normal(keys[1], (3, batch, length, KV_HEADS, dv), dtype),
        k_cmp=jax.random.normal(keys[2], (batch, slots, KV_HEADS, dk), dtype),
        v_cmp=jax.random.normal(keys[3], (batch, slots, KV_HEADS, dv), dtype),
        lengths=jnp.full((batch,), length, jnp.int32),
    )


@jax.jit
def reference_importance(q: jax.Array, cache: NSACache) -> jax.Array:
    """float32 ``[B, H, Nb]`` Eq. 9-10 importance as the xla path computes it."""
    batch, slots = cache.k_cmp.shape[:2]
    positions = (cache.lengths - 1)[:, None]
    starts = jnp.zeros((batch, 1), jnp.int32)
    token_starts = jnp.broadcast_to(
        jnp.arange(slots, dtype=jnp.int32) * PAPER["block_stride"], (batch, slots)
    )
    scale = q.shape[-1] ** -0.5
    args = (q[:, None], positions, starts, token_starts, cache.k_cmp)
    _, lse = attend_compressed(*args, cache.v_cmp, block_length=PAPER["block_length"], scale=scale)
    probs = compression_probabilities(
        q[:, None],
        lse,
        positions,
        starts,
        token_starts,
        cache.k_cmp,
        block_length=PAPER["block_length"],
        scale=scale,
    )
    importance = block_importance(
        probs,
        starts,
        num_kv_heads=KV_HEADS,
        block_length=PAPER["block_length"],
        block_stride=PAPER["block_stride"],
        selection_block_size=PAPER["selection_block_size"],
        num_blocks=-(-slots * PAPER["block_stride"] // PAPER["selection_block_size"]),
    )
    return importance[:, 0]


def check_paths(q: jax.Array, cache: NSACache, paths, dk: int) -> dict:
    """Relative errors of every path against ``xla`` and the ``new`` block indices against ``xla``'s."""

    @jax.jit
    def outputs(q, cache):
        outs = {path: nsa_step(path)(q, cache) for path in {*paths, "xla"}}
        args = (q, cache.k_cmp, cache.v_cmp, cache.lengths)
        ref_indices = registry.resolve("decode_compressed_selection", "xla", *args, **selection_kwargs(dk))(
            *args, **selection_kwargs(dk)
        )[1]
        if jax.default_backend() == "gpu":
            # The blocks the new step reads: its second kernel picks them.
            indices = launched_step(dk, None, None, return_picks=True)(q, cache)[3]
        else:
            indices = registry.resolve("decode_compressed_selection", None, *args, **selection_kwargs(dk))(
                *args, **selection_kwargs(dk)
            )[1]
        return outs, indices, ref_indices

    outs, indices, ref_indices = outputs(q, cache)
    result = {}
    for path in (p for p in paths if p != "xla"):
        errors = [relative_error(o, r) for o, r in zip(outs[path], outs["xla"], strict=True)]
        result[f"{path}_rel_err"] = dict(zip(("compressed", "selected", "window"), errors, strict=True))
    indices, ref_indices = np.asarray(indices), np.asarray(ref_indices)
    differing = np.argwhere(np.any(indices != ref_indices, axis=-1))
    result["index_rows"] = int(np.prod(indices.shape[:2]))
    result["index_rows_differing"] = len(differing)
    if len(differing):
        importance = np.asarray(reference_importance(q, cache))
        gaps = []
        for b, h in differing:
            swapped = sorted(set(indices[b, h].tolist()) ^ set(ref_indices[b, h].tolist()))
            if len(swapped) < 2 or swapped[0] < 0:
                gaps.append(float("inf"))  # a different number of blocks is never a tie
                continue
            values = importance[b, h, swapped]
            gaps.append(float((values.max() - values.min()) / importance[b, h].max()))
        result["index_max_importance_gap"] = max(gaps)
    return result


def failures_of(check: dict, where: str) -> list[str]:
    """What breaks ``TOLERANCE`` or differs in block indices beyond a near-tie; empty when correct."""
    failures = [
        f"{where}: {key} {errors} exceeds {TOLERANCE}"
        for key, errors in check.items()
        if key.endswith("_rel_err") and max(errors.values()) > TOLERANCE
    ]
    if check["index_rows_differing"] and check["index_max_importance_gap"] > NEAR_TIE:
        failures.append(f"{where}: block indices differ beyond a near-tie: {check}")
    return failures


def component_split(q, cache, dk: int, steps: int, repeats: int, num_sets: int, sets) -> dict:
    """Kernel 1's time alone in the ``new`` path (GPU); its second kernel takes the rest."""
    from pallas_kernels.gpu import decode_step

    kwargs = selection_kwargs(dk)

    def kernel1(q, c):
        return decode_step.compressed_pass(q, c.k_cmp, c.v_cmp, c.lengths, **kwargs)[2:3]

    fn, ran = looped(kernel1, num_sets, steps)
    return {"compressed_pass_ms": time_loop(fn, (q, sets), ran, repeats)}


# Kernel 1 launches (tile, num_warps, num_stages, target programs) tried by --tune besides the
# default (None; 90/72 KB), with their sm_90a shared memory at Dk=192/128 (kernel_resources):
# the previous defaults (94/76 KB, one buffer), two stages (50/40 KB), four stages on one program
# per SM (130/104 KB), 32-token tiles with four stages (68/54 KB, three programs per SM), and the
# default with eight warps (128/102 registers against 140/148 with four).
LAUNCHES = (
    (128, 4, 2, 264),
    (128, 8, 2, 264),
    (64, 4, 2, 264),
    (64, 4, 4, 132),
    (32, 4, 4, 264),
    (64, 8, 3, 264),
)
# Launches of the whole step's second kernel (num_warps, num_stages, target programs, items per
# step) tried by --tune: the default first (three stages, two programs per SM: 2 selecting and 2
# window programs a row at B=16), eight warps, 396 and 320 programs (a second wave at B=16: 3 + 2
# programs of at most 6 items a row at 320), two items per step (session 21 timed the first four
# in the step: 85.5, 88.8, 99.0 and 93.9 us at B=16, S=64K, Dk=192).
READS_LAUNCHES = (
    (4, 3, 264, 1),
    (8, 3, 264, 1),
    (4, 3, 396, 1),
    (4, 3, 320, 1),
    (4, 2, 264, 2),
)


def launched_step(dk: int, launch, reads_launch, interpret: bool | None = None, return_picks: bool = False):
    """``fn(q, cache) -> (compressed, selected, window)``: the ``new`` step under given launches
    (``None``: the default of that kernel); with ``return_picks``, also its block indices."""
    from pallas_kernels.gpu import decode_step

    interpret = jax.default_backend() != "gpu" if interpret is None else interpret

    def step(q, c):
        return decode_step.whole_step(
            q,
            c.keys,
            c.values,
            c.k_cmp,
            c.v_cmp,
            c.lengths,
            **selection_kwargs(dk),
            window=PAPER["window"],
            launch=launch,
            reads_launch=reads_launch,
            interpret=interpret,
            return_picks=return_picks,
        )

    return step


def tune(batch: int, length: int, dims, steps: int, repeats: int) -> list[dict]:
    """Per head dims (GPU): kernel 1 (compressed attention + Eq. 9 sums) alone under its default
    launch and ``LAUNCHES``, then the whole step with the fastest of them under
    ``READS_LAUNCHES`` for its second kernel (selection + reads), each checked against the xla
    path first."""
    return [result for dk, dv in dims for result in tune_dims(batch, length, dk, dv, steps, repeats)]


def tune_dims(batch: int, length: int, dk: int, dv: int, steps: int, repeats: int) -> list[dict]:
    from pallas_kernels.gpu import decode_step

    key = jax.random.key(length + batch + dk)
    cache = random_cache(key, batch=batch, length=length, dk=dk, dv=dv)
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, HEADS, dk), jnp.bfloat16)
    kwargs = selection_kwargs(dk)
    cmp_bytes = batch * KV_HEADS * num_compressed_slots(length, PAPER["block_stride"]) * (dk + dv) * 2
    args = (q, cache.k_cmp, cache.v_cmp, cache.lengths)
    ref_indices = registry.resolve("decode_compressed_selection", "xla", *args, **kwargs)(*args, **kwargs)[1]
    reference = jax.jit(nsa_step("xla"))(q, cache)
    results = []

    def timed(piece, nbytes: int, **result) -> float:
        fn, ran = looped(piece, 1, steps)
        ms = time_loop(fn, (q, ((cache,),)), ran, repeats)
        results.append({"B": batch, "S": length, "dk": dk, "dv": dv, **result, "ms": ms})
        results[-1]["GB/s"] = nbytes / ms / 1e6
        print(json.dumps(results[-1]), flush=True)
        return ms

    def kernel1(launch):
        return lambda q, c: decode_step.compressed_pass(
            q, c.k_cmp, c.v_cmp, c.lengths, **kwargs, launch=launch
        )[2:3]

    first = {
        launch: timed(kernel1(launch), cmp_bytes, kernel=1, launch=launch) for launch in (None, *LAUNCHES)
    }
    best = min(first, key=first.get)
    for reads_launch in READS_LAUNCHES:
        *outputs, picks = jax.jit(launched_step(dk, best, reads_launch, return_picks=True))(q, cache)
        errors = [relative_error(o, r) for o, r in zip(outputs, reference, strict=True)]
        differing = int(np.sum(np.any(np.asarray(picks) != np.asarray(ref_indices), axis=-1)))
        launches = (best, reads_launch)
        result = dict(kernel="step", launch=launches, rel_err=max(errors), index_rows_differing=differing)
        # Differing index rows are reported, not failed: a near-tie may flip with the chunking.
        if max(errors) > TOLERANCE:
            result["failures"] = [f"Dk={dk} launches {launches}: relative errors {errors}"]
            print(f"CORRECTNESS FAILURE {result['failures'][0]}", flush=True)
        timed(launched_step(dk, best, reads_launch), nsa_bytes(batch, length, dk, dv), **result)
    return results


def tune_markdown(tuned: list[dict]) -> str:
    names = {1: "kernel 1 alone", "step": "whole step, kernel 1's fastest and"}
    lines = [
        "\nLaunch variants (kernel 1: tile, warps, stages, target programs, None = default; the "
        "whole step's second kernel: warps, stages, target programs, items per step; GB/s of the "
        "compressed cache (kernel 1), of all (step)):\n\n"
    ]
    for t in tuned:
        check = ""
        if t["kernel"] == "step":
            check = (
                f" (rel. error {t['rel_err']:.1e}, {t['index_rows_differing']} index rows differ from xla)"
            )
        speed = f"{t['ms']:.4f} ms, {t['GB/s']:.0f} GB/s"
        lines.append(f"- Dk={t['dk']} {names[t['kernel']]} {t['launch']}: {speed}{check}\n")
    return "".join(lines)


def matched_dense(key, batch: int, length: int, dk: int, dv: int, steps: int, repeats: int) -> dict:
    """Dense cuDNN decode with the NSA step's head dims (``Dk``/``Dv``), as bench_layer.py's
    ``cudnn_dense_native_dv``: ``dense_cudnn_dk{Dk}_dv{Dv}_ms`` and its bytes a step."""
    tag = f"dense_cudnn_dk{dk}_dv{dv}"
    nbytes = batch * length * KV_HEADS * (dk + dv) * 2
    num_sets = sets_for(nbytes)
    sets = tuple(
        (
            jax.random.normal(jax.random.fold_in(key, 300 + i), (batch, length, KV_HEADS, dk), jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(key, 400 + i), (batch, length, KV_HEADS, dv), jnp.bfloat16),
        )
        for i in range(num_sets)
    )
    q = jax.random.normal(jax.random.fold_in(key, 98), (batch, 1, HEADS, dk), jnp.bfloat16)
    fn, ran = looped(dense_step("cudnn", dk, dv), num_sets, steps)
    return {f"{tag}_ms": time_loop(fn, (q, sets), ran, repeats), f"{tag}_bytes": nbytes}


def bench(batches, lengths, dims, paths, dense_impls, steps, repeats, split_lengths) -> list[dict]:
    rows = []
    for batch in batches:
        for length in lengths:
            key = jax.random.key(length + batch)
            row = {"B": batch, "S": length, "dense_bytes": 2 * batch * length * KV_HEADS * DENSE_DIM * 2}
            num_sets = sets_for(row["dense_bytes"])
            row["dense_sets"] = num_sets
            dense_sets = tuple(
                tuple(
                    jax.random.normal(k, (batch, length, KV_HEADS, DENSE_DIM), jnp.bfloat16)
                    for k in jax.random.split(jax.random.fold_in(key, i), 2)
                )
                for i in range(num_sets)
            )
            q = jax.random.normal(jax.random.fold_in(key, 99), (batch, 1, HEADS, DENSE_DIM), jnp.bfloat16)
            for impl in dense_impls:
                fn, ran = looped(dense_step(impl, DENSE_DIM, DENSE_DIM), num_sets, steps)
                row[f"dense_{impl}_ms"] = time_loop(fn, (q, dense_sets), ran, repeats)
            del dense_sets
            for dk, dv in dims:
                if (dk, dv) != (DENSE_DIM, DENSE_DIM) and "cudnn" in dense_impls:
                    row.update(matched_dense(key, batch, length, dk, dv, steps, repeats))
            for dk, dv in dims:
                tag = f"nsa_dk{dk}_dv{dv}"
                row[f"{tag}_bytes"] = nsa_bytes(batch, length, dk, dv)
                row[f"{tag}_new_block_sums_bytes"] = block_sums_bytes(batch, length)
                num_sets = sets_for(row[f"{tag}_bytes"])
                row[f"{tag}_sets"] = num_sets
                sets = tuple(
                    (
                        random_cache(
                            jax.random.fold_in(key, 100 + i), batch=batch, length=length, dk=dk, dv=dv
                        ),
                    )
                    for i in range(num_sets)
                )
                q = jax.random.normal(jax.random.fold_in(key, 200), (batch, HEADS, dk), jnp.bfloat16)
                check = check_paths(q, sets[0][0], paths, dk)
                row[f"{tag}_check"] = check
                failures = failures_of(check, f"B={batch} S={length} Dk={dk} Dv={dv}")
                row.setdefault("failures", []).extend(failures)
                for failure in failures:
                    print(f"CORRECTNESS FAILURE {failure}", flush=True)
                for path in paths:
                    fn, ran = looped(nsa_step(path), num_sets, steps)
                    row[f"{tag}_{path}_ms"] = time_loop(fn, (q, sets), ran, repeats)
                if length in split_lengths and jax.default_backend() == "gpu":
                    split = component_split(q, sets[0][0], dk, steps, repeats, num_sets, sets)
                    row[f"{tag}_new_split"] = split
                del sets
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], dims, paths, dense_impls, command: str) -> str:
    device = jax.devices()[0].device_kind
    lines = [
        f"# NSA decode step vs dense decode ({device}, jax {jax.__version__}, bf16)",
        "",
        f"Command: `{command}`. Milliseconds per step: a jitted `fori_loop` of steps without host "
        "sync, median of calls after a warm-up. HQ=64, H=4; NSA paper geometry (l=32, d=16, l'=64, "
        "n=16, w=512); dense D=128, and with the NSA step's own head dims where they differ (`dense "
        "cudnn Dk/Dv`, cuDNN's Dv != Dk path). Speed-up = best dense D=128 / NSA `new`; `vs dense Dk/Dv` = "
        "that dense / NSA `new`. GB/s = cache bytes read by `new` per step / its time.",
        "",
    ]
    matched = [(dk, dv) for dk, dv in dims if rows and f"dense_cudnn_dk{dk}_dv{dv}_ms" in rows[0]]
    header = (
        ["B", "S"] + [f"dense {c}" for c in dense_impls] + [f"dense cudnn {dk}/{dv}" for dk, dv in matched]
    )
    for dk, dv in dims:
        header += [f"NSA {dk}/{dv} {p}" for p in paths] + [f"speed-up {dk}/{dv}"]
        header += [f"speed-up {dk}/{dv} vs dense {dk}/{dv}"] if (dk, dv) in matched else []
        header += [f"GB/s {dk}/{dv}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        best_dense = min(r[f"dense_{c}_ms"] for c in dense_impls)
        cells = [str(r["B"]), f"{r['S'] // 1024}K"] + [f"{r[f'dense_{c}_ms']:.3f}" for c in dense_impls]
        cells += [f"{r[f'dense_cudnn_dk{dk}_dv{dv}_ms']:.3f}" for dk, dv in matched]
        for dk, dv in dims:
            tag = f"nsa_dk{dk}_dv{dv}"
            cells += [f"{r[f'{tag}_{p}_ms']:.3f}" for p in paths]
            new = r[f"{tag}_{paths[0]}_ms"]
            cells += [f"{best_dense / new:.1f}x"]
            if (dk, dv) in matched:
                cells += [f"{r[f'dense_cudnn_dk{dk}_dv{dv}_ms'] / new:.1f}x"]
            cells += [f"{r[f'{tag}_bytes'] / new / 1e6:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [failure for r in rows for failure in r.get("failures", [])]
    if failures:
        lines += ["", "**CORRECTNESS FAILURES**:", ""] + [f"- {failure}" for failure in failures]
    lines += [
        "",
        "Correctness against the xla path (max relative error over branches; differing index rows):",
        "",
    ]
    for r in rows:
        for dk, dv in dims:
            check = r[f"nsa_dk{dk}_dv{dv}_check"]
            errors = ", ".join(f"{p} {max(check[f'{p}_rel_err'].values()):.1e}" for p in paths if p != "xla")
            gap = check.get("index_max_importance_gap")
            ties = "" if gap is None else f" (max importance gap {gap:.1e})"
            lines.append(
                f"- B={r['B']} S={r['S'] // 1024}K {dk}/{dv}: {errors}; indices differ in "
                f"{check['index_rows_differing']}/{check['index_rows']} rows{ties}"
            )
    splits = [(r, dk, dv) for r in rows for dk, dv in dims if f"nsa_dk{dk}_dv{dv}_new_split" in r]
    if splits:
        lines += [
            "",
            "Split of the `new` step (ms per step, same loop method): kernel 1 alone, and the whole step; "
            "the rest is the second kernel (selection and reads), the gap between the launches and the "
            "loop's fusions.",
            "",
            "| B | S | Dk/Dv | kernel 1 | whole step | rest |",
            "|---|---|---|---|---|---|",
        ]
        for r, dk, dv in splits:
            tag = f"nsa_dk{dk}_dv{dv}"
            first, whole = r[f"{tag}_new_split"]["compressed_pass_ms"], r[f"{tag}_{paths[0]}_ms"]
            times = f"{first:.3f} | {whole:.3f} | {whole - first:.3f}"
            lines.append(f"| {r['B']} | {r['S'] // 1024}K | {dk}/{dv} | {times} |")
    lines += ["", "Bytes per step counted from shapes (MB; `new` adds its Eq. 9 sums' round trip):", ""]
    lines += [
        "| B | S | dense | " + " | ".join(f"NSA {dk}/{dv}" for dk, dv in dims) + " | new Eq. 9 sums |",
        "|---|---|---|" + "---|" * len(dims) + "---|",
    ]
    for r in rows:
        nsa = " | ".join(f"{r[f'nsa_dk{dk}_dv{dv}_bytes'] / 1e6:.1f}" for dk, dv in dims)
        extra = r[f"nsa_dk{dims[0][0]}_dv{dims[0][1]}_new_block_sums_bytes"] / 1e6
        lines.append(f"| {r['B']} | {r['S'] // 1024}K | {r['dense_bytes'] / 1e6:.1f} | {nsa} | {extra:.1f} |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test on any backend")
    parser.add_argument("--out", type=pathlib.Path, help="directory for decode_<backend>.json and .md")
    parser.add_argument("--batches", type=_ints, default=[1, 16])
    parser.add_argument("--lengths", type=_ints, default=[8192, 16384, 32768, 65536])
    parser.add_argument("--dims", default="192x128,128x128", help="Dk x Dv pairs, comma separated")
    parser.add_argument(
        "--paths", default="new,prev", help=f"NSA paths to time, from {PATHS}; new always runs"
    )
    parser.add_argument("--dense", default="cudnn,xla", help="dense implementations (cudnn on GPU only)")
    parser.add_argument(
        "--split-lengths", type=_ints, default=[65536], help="lengths with a per-kernel split"
    )
    # 96 rather than 24 (before session 13): the call's own cost, spread over fewer steps, added
    # 4 us a step to NSA (0.082 against 0.078 ms at B=16, 64K, Dk=128) and 17 us to dense
    # (experiments/results/decode_h200.md, session 13).
    parser.add_argument("--steps", type=int, default=96, help="decode steps per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="also time kernels 1 and 3 under other launches and the step under the fastest (largest B, S)",
    )
    args = parser.parse_args()
    dims = [tuple(int(x) for x in pair.split("x")) for pair in args.dims.split(",")]
    paths = ["new"] + [p for p in PATHS if p != "new" and p in args.paths.split(",")]
    dense = [d for d in args.dense.split(",") if d != "cudnn" or jax.default_backend() == "gpu"]
    batches, lengths, steps, repeats = args.batches, args.lengths, args.steps, args.repeats
    if args.quick:
        batches, lengths, dims, steps, repeats = [1, 2], [1024, 2048], [(192, 128)], 4, 2
    start = time.perf_counter()
    rows = bench(batches, lengths, dims, paths, dense, steps, repeats, args.split_lengths)
    command = " ".join(["python experiments/bench_decode.py", *sys.argv[1:]])
    report = markdown(rows, dims, paths, dense, command)
    tuned = []
    if args.tune and jax.default_backend() == "gpu":
        tuned = tune(max(batches), max(lengths), dims, steps, repeats)
        report += tune_markdown(tuned)
    report += f"\nWall time of the run: {time.perf_counter() - start:.0f} s.\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"decode_{jax.default_backend()}"
        (args.out / f"{stem}.json").write_text(
            json.dumps(
                {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows, "tune": tuned},
                indent=2,
            )
        )
        (args.out / f"{stem}.md").write_text(report)
    failures = [failure for row in (*rows, *tuned) for failure in row.get("failures", [])]
    if failures:
        # Timing went on so that one run yields all numbers; the run still fails.
        raise SystemExit("CORRECTNESS FAILURES:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
