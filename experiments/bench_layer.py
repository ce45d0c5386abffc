"""The whole NSA attention op and layer on one GPU: correctness, time per branch, memory, fla-core.

Run from the repo root on the GPU (fla-core installed under PYTHONPATH for the
``fla`` part; skipped with a message when missing)::

    PYTHONPATH=$PWD python3 experiments/bench_layer.py --out OUT_DIR \\
        [--lengths 65536 32768 16384 8192] [--parts memory,check,fla,time] [--budget-s 420] \\
        [--override select_blocks=pallas_triton]

Parts, run in this order:

- ``memory``: peak GPU memory (``memory_stats()["peak_bytes_in_use"]``) of one
  forward+backward of a ``NativeSparseAttention`` layer (paper configuration, bf16
  compute, float32 parameters, B=1, T=``--memory-length``, ``--model-dim``), in a
  fresh process so that nothing else has touched the allocator.
- ``check``: the layer's output and gradients (parameters and input) with the
  default implementations against all-``xla`` in float32 at T=``--check-length`` (4050
  on GPU, not a multiple of l, d, l'), float32 and bf16, unpacked and packed (bf16 also
  reports the all-xla bf16 layer's error, see :func:`check_layer`); the cuDNN window
  op in bf16 against the float32 xla reference (Dk=192/Dv=128 and Dk=64/Dv=128, w=512, odd
  T), and the Pallas window (which serves packed rows and float32) packed in bf16 and
  float32; with ``--override``, also ``nsa_attention`` with those implementations against
  all-xla.
  Relative error ``||x - ref|| / ||ref||``, bounds float32 1e-3, bf16 1e-2.
- ``fla``: fla-core 0.6.0 ``parallel_nsa`` (mean pooling, compression + top-16 +
  selection, l=l'=d=64, window 0) against ``nsa_attention`` at the same settings
  (branches compressed and selected, ``k_cmp``/``v_cmp`` mean-pooled from the same
  k/v inside the timed function), bf16, HQ=64, H=4, D=128, forward and
  forward+backward (gradients in q, k, v and the gates).
- ``time``: ``nsa_attention`` at the paper configuration (l=32, d=16, l'=64,
  n=16, w=512, HQ=64, H=4), Dk=192/Dv=128 and Dk=Dv=128, bf16, B=1, forward and
  forward+backward in all inputs; each op alone on the same inputs (the split by
  branch); every implementation that runs natively here, for the paper head dims
  at ``--alternatives-at`` lengths (the priority decision); cuDNN dense causal
  attention at head dim max(Dk, Dv).
  Skips the remaining lengths once ``--budget-s`` has passed since the start.
- ``window``: the window op alone on packed rows (four segments), Dk=192/Dv=128, w=512,
  bf16, at ``--lengths``: every implementation that runs natively here and serves packed
  rows (cuDNN does not), forward and forward+backward.

Times: median of timed calls after two warm-up calls, each ended by
``block_until_ready`` (JAX), or ``triton.testing.do_bench`` median (fla-core). Inputs
are not rotated: one q alone (>= 100 MB at 8K) exceeds the 50 MB L2.

Writes ``layer.json`` and ``layer.md`` to ``--out``; prints the Markdown last. Exits 1
if a check failed (after the other parts ran). On CPU, ``--lengths 1024 --parts
check,time`` runs a small smoke version (HQ=8, H=2, head dims / 4; cuDNN parts and
memory skipped with a note).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from flax import nnx

import nsa_jax
from experiments.measure import relative_error, time_jax
from nsa_jax import cudnn as nsa_cudnn
from nsa_jax import registry
from nsa_jax.ops import combine_branches
from nsa_jax.segments import num_compressed_slots

PARTS = ("memory", "check", "fla", "time", "window")
OPS = ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention")
PAPER = dict(block_length=32, block_stride=16, selection_block_size=64, num_selected=16, window=512)
FLA = dict(block_length=64, block_stride=64, selection_block_size=64, num_selected=16)
NSA_INPUTS = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")
SELECTION_KEYS = ("block_length", "block_stride", "selection_block_size", "num_selected")
TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-2}
ON_GPU = jax.default_backend() == "gpu"
# On CPU the script is a smoke test: 8x fewer heads (G=4) and 4x smaller head dims.
HEADS = dict(q_heads=64, kv_heads=4) if ON_GPU else dict(q_heads=8, kv_heads=2)
HEAD_DIMS = {"Dk192_Dv128": (192, 128), "Dk128_Dv128": (128, 128)}
if not ON_GPU:
    HEAD_DIMS = {name: (dk // 4, dv // 4) for name, (dk, dv) in HEAD_DIMS.items()}
PAPER_DIMS = HEAD_DIMS["Dk192_Dv128"]
FLA_DIM = 128 if ON_GPU else 32
# The pure-JAX selected attention gathers n*l' keys per query: ~0.4 s forward+backward
# at 16K (experiments/results/selection_h200.md), so it is timed only up to here.
XLA_SELECTED_MAX_LENGTH = 16384


def iterations(length: int, iters: int) -> int:
    return iters if length <= 16384 else max(3, iters // 2)


def with_vjp(fn: Callable, num_diff: int) -> Callable:
    """``fn(*args, cotangent)``: forward then the vjp in the first ``num_diff`` args."""

    def run(*args):
        *args, cotangent = args
        diff, rest = args[:num_diff], args[num_diff:]
        out, vjp = jax.vjp(lambda *d: fn(*d, *rest), *diff)
        return out, vjp(cotangent)

    return jax.jit(run)


# ---------------------------------------------------------------------------- inputs


def op_inputs(length: int, dk: int, dv: int, geometry: dict, dtype=jnp.bfloat16, seed: int = 0) -> dict:
    """Random ``nsa_attention`` inputs, B=1: q, compressed/selected/window K/V, gates, cotangent."""
    q_heads, kv_heads = HEADS["q_heads"], HEADS["kv_heads"]
    slots = num_compressed_slots(length, geometry["block_stride"])
    keys = iter(jax.random.split(jax.random.key(seed), 10))

    def normal(*shape):
        return jax.random.normal(next(keys), (1, *shape), jnp.float32).astype(dtype)

    return dict(
        q=normal(length, q_heads, dk),
        k_cmp=normal(slots, kv_heads, dk),
        v_cmp=normal(slots, kv_heads, dv),
        k_slc=normal(length, kv_heads, dk),
        v_slc=normal(length, kv_heads, dv),
        k_win=normal(length, kv_heads, dk),
        v_win=normal(length, kv_heads, dv),
        gates=jax.nn.sigmoid(normal(length, q_heads, 3)),
        cotangent=normal(length, q_heads, dv),
    )


def op_arguments(x: dict, geometry: dict, segment_ids=None) -> dict[str, tuple[tuple, dict]]:
    """Each branch op's arguments as its ``check`` receives them (validated form)."""
    scale = x["q"].shape[-1] ** -0.5
    lse = jnp.zeros(x["q"].shape[:3], jnp.float32)
    selection = {k: geometry[k] for k in ("block_length", "block_stride", "selection_block_size")}
    indices = jnp.zeros((*x["k_slc"].shape[:3], geometry["num_selected"]), jnp.int32)
    common = dict(scale=scale, segment_ids=segment_ids)
    return {
        "compressed_attention": (
            (x["q"], x["k_cmp"], x["v_cmp"]),
            dict(block_length=geometry["block_length"], block_stride=geometry["block_stride"], **common),
        ),
        "select_blocks": (
            (x["q"], x["k_cmp"], lse),
            dict(
                selection,
                num_selected=geometry["num_selected"],
                num_initial_blocks=1,
                num_local_blocks=2,
                **common,
            ),
        ),
        "selected_attention": (
            (x["q"], x["k_slc"], x["v_slc"], indices),
            dict(block_size=geometry["selection_block_size"], **common),
        ),
        "sliding_window_attention": (
            (x["q"], x["k_win"], x["v_win"]),
            dict(window=geometry.get("window", 1), **common),
        ),
    }


# op -> implementation name from --override, used instead of the registry's default by
# the fla and time parts (e.g. to time a kernel that is still opt-in).
OVERRIDES: dict[str, str] = {}


def defaults(x: dict, geometry: dict, segment_ids=None) -> dict[str, str]:
    """What ``implementation=None`` picks for each branch op on these inputs."""
    return {
        op: registry.default(op, *args, **kwargs)
        for op, (args, kwargs) in op_arguments(x, geometry, segment_ids).items()
    }


def chosen(x: dict, geometry: dict) -> dict[str, str]:
    """The implementation of each branch op that the fla and time parts use."""
    return {**defaults(x, geometry), **OVERRIDES}


def native_candidates(x: dict, geometry: dict, segment_ids=None) -> dict[str, list[str]]:
    """Implementations of each op that run natively on this backend and serve these inputs."""
    backend = jax.default_backend()
    out = {}
    for op, (args, kwargs) in op_arguments(x, geometry, segment_ids).items():
        names = []
        for name in registry.implementations(op):
            impl = registry.get(op, name)
            if backend not in impl.platforms:
                continue
            try:
                if impl.check is not None:
                    impl.check(*args, **kwargs)
            except ValueError:
                continue
            names.append(name)
        out[op] = names
    return out


# ---------------------------------------------------------------------------- memory


def layer_config(model_dim: int, dtype, implementation=None, **overrides) -> nsa_jax.NSAConfig:
    return nsa_jax.NSAConfig(
        model_dim=model_dim,
        num_heads=HEADS["q_heads"],
        num_kv_heads=HEADS["kv_heads"],
        head_dim_qk=PAPER_DIMS[0],
        head_dim_v=PAPER_DIMS[1],
        dtype=dtype,
        param_dtype=jnp.float32,
        implementation=implementation,
        **{**PAPER, **overrides},
    )


def layer_forward_backward(layer: nsa_jax.NativeSparseAttention, segment_ids=None) -> Callable:
    """jitted ``(params, x, cotangent) -> (y, (d params, dx))``."""
    graphdef, params = nnx.split(layer)
    del params

    def forward(params, x):
        return nnx.merge(graphdef, params)(x, segment_ids=segment_ids)

    def run(params, x, cotangent):
        y, vjp = jax.vjp(forward, params, x)
        return y, vjp(cotangent)

    return jax.jit(run)


def memory_child(length: int, model_dim: int) -> dict:
    """Peak memory of one layer forward+backward in this (fresh) process."""
    device = jax.devices()[0]
    config = layer_config(model_dim, jnp.bfloat16)
    layer = nsa_jax.NativeSparseAttention(config, rngs=nnx.Rngs(0))
    params = nnx.state(layer)
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (1, length, model_dim), jnp.bfloat16)
    cotangent = jax.random.normal(keys[1], (1, length, model_dim), jnp.bfloat16)
    jax.block_until_ready((params, x, cotangent))
    before = device.memory_stats()["bytes_in_use"]
    # Compiling may autotune on the device; the peak read after compiling tells whether
    # the step itself set the final peak.
    step = layer_forward_backward(layer).lower(params, x, cotangent).compile()
    peak_after_compile = device.memory_stats()["peak_bytes_in_use"]
    jax.block_until_ready(step(params, x, cotangent))
    stats = device.memory_stats()
    analysis = step.memory_analysis()
    x_sample = op_inputs(256, *PAPER_DIMS, PAPER)
    return {
        "T": length,
        "model_dim": model_dim,
        "param_bytes": sum(p.nbytes for p in jax.tree.leaves(params)),
        "bytes_in_use_before": before,
        "peak_bytes_in_use": stats["peak_bytes_in_use"],
        "peak_minus_before": stats["peak_bytes_in_use"] - before,
        "peak_after_compile": peak_after_compile,
        "xla_temp_bytes": None if analysis is None else analysis.temp_size_in_bytes,
        "defaults": defaults(x_sample, PAPER),
    }


def memory_part(args) -> dict:
    if not ON_GPU:
        print("memory: skipped, memory_stats() needs a GPU", flush=True)
        return {"skipped": "not on a GPU"}
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        "--memory-length",
        str(args.memory_length),
        "--model-dim",
        str(args.model_dim),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        print("memory: the child process ran past 300 s", flush=True)
        return {"error": "child ran past 300 s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
    if done.returncode or not lines:
        print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
        return {"error": f"child exited {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    result = json.loads(lines[-1][len("MEMORY ") :])
    print("memory:", result, flush=True)
    return result


# ---------------------------------------------------------------------------- check


def tree_errors(ours, ref) -> dict[str, float]:
    """Error of every leaf, keyed by its path: ``||a - b|| / max(||b||, floor)``.

    ``floor`` is 1e-3 of the largest reference leaf norm: some gradients are zero in
    exact arithmetic (the bias added to every compressed key shifts all logits of a row
    equally, so softmax cancels it) and their plain relative error measures rounding noise.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(ours)
    flat_ref = jax.tree.leaves(ref)
    norms = [float(jnp.linalg.norm(jnp.asarray(b, jnp.float32))) for b in flat_ref]
    floor = 1e-3 * max(norms)
    return {
        jax.tree_util.keystr(path): float(
            jnp.linalg.norm(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) / max(norm, floor)
        )
        for (path, a), b, norm in zip(flat, flat_ref, norms, strict=True)
    }


def segments_at(length: int, cuts: list[int]) -> jax.Array:
    """int32 ``[1, T]`` segment ids of one row, a new segment starting at each cut."""
    return jnp.sum(jnp.arange(length)[:, None] >= jnp.asarray(cuts), axis=1).astype(jnp.int32)[None]


def packed_rows(length: int, segments: int = 4) -> jax.Array:
    """int32 ``[1, T]``: ``segments`` segments whose boundaries fall inside tiles."""
    return segments_at(length, [length * i // segments + 7 * i for i in range(1, segments)])


def check_layer(dtype, packed: bool, length: int, model_dim: int) -> dict:
    """The layer with the default implementations against all-xla in float32, forward and
    gradients (the same float32 parameters; inputs rounded to ``dtype`` first).

    ``num_selected`` covers every block, so both paths attend to the same keys: with the
    paper's n=16, rounding-level differences in the compressed scores flip near-tied top-n
    picks and move whole blocks between the paths. The selection itself is checked for
    exact equality against the reference, given the same scores, in
    ``experiments/check_compression_gpu.py``.

    In bf16 the all-xla layer in bf16 is measured against the same float32 reference too:
    a gradient passes when its error is under the bf16 bound or at most 1.25 times the
    error of the pure-JAX path in the same precision (a whole layer's gradients sum bf16
    products over thousands of tokens, and the bound of one op does not apply to them).
    """
    # One row, packed or not: the float32 xla selection gathers n * l' keys per query, which
    # at T=4050 with every block is 25 GB a row (two rows ran out of memory on the H200).
    batch = 1
    every_block = -(-length // PAPER["selection_block_size"])
    keys = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(keys[0], (batch, length, model_dim), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(keys[1], (batch, length, model_dim), jnp.float32).astype(dtype)
    segment_ids = None
    if packed:
        segment_ids = segments_at(length, [length // 4 + 1, length // 2 + 75, 3 * length // 4 - 2])
    runs = {"kernels": (None, dtype), "reference": ("xla", jnp.float32)}
    if dtype != jnp.float32:
        runs["xla_same_dtype"] = ("xla", dtype)
    results = {}
    for name, (implementation, compute_dtype) in runs.items():
        config = layer_config(model_dim, compute_dtype, implementation, num_selected=every_block)
        layer = nsa_jax.NativeSparseAttention(config, rngs=nnx.Rngs(0))
        results[name] = layer_forward_backward(layer, segment_ids)(
            nnx.state(layer), x.astype(compute_dtype), cotangent.astype(compute_dtype)
        )

    def errors_of(name: str) -> dict[str, float]:
        (y, (d_params, dx)), (y_ref, (d_params_ref, dx_ref)) = results[name], results["reference"]
        errors = {"y": relative_error(y, y_ref), "dx": relative_error(dx, dx_ref)}
        errors.update({f"d{k}": v for k, v in tree_errors(d_params, d_params_ref).items()})
        return errors

    errors = errors_of("kernels")
    bounds = {k: TOLERANCE[jnp.dtype(dtype).name] for k in errors}
    xla_errors = None
    if "xla_same_dtype" in results:
        xla_errors = errors_of("xla_same_dtype")
        bounds = {k: max(bound, 1.25 * xla_errors[k]) for k, bound in bounds.items()}
    finite = all(
        bool(jnp.isfinite(jnp.asarray(a, jnp.float32)).all()) for a in jax.tree.leaves(results["kernels"])
    )
    name = jnp.dtype(dtype).name
    sample = op_inputs(256, *PAPER_DIMS, PAPER, dtype)
    seg_sample = None if segment_ids is None else jnp.zeros((1, 256), jnp.int32)
    return {
        "what": f"layer, T={length}, B={batch}, {'packed' if packed else 'unpacked'}, {name} vs float32 xla, "
        f"n={every_block} (every block)",
        "defaults": defaults(sample, PAPER, seg_sample),
        "errors": errors,
        "xla_same_dtype_errors": xla_errors,
        "max_error": max(errors.values()),
        "finite": finite,
        "ok": finite and all(errors[k] <= bounds[k] for k in errors),
    }


def check_window(
    length: int, dk: int, dv: int, implementation: str, dtype=jnp.bfloat16, packed=False
) -> dict:
    """The window op of ``implementation`` against the float32 xla reference."""
    x = op_inputs(length, dk, dv, PAPER, dtype)
    window = PAPER["window"]
    segment_ids = packed_rows(length) if packed else None

    def attend(implementation):
        return lambda q, k, v: nsa_jax.sliding_window_attention(
            q, k, v, window=window, segment_ids=segment_ids, implementation=implementation
        )

    out, grads = with_vjp(attend(implementation), 3)(x["q"], x["k_win"], x["v_win"], x["cotangent"])
    f32 = [x[n].astype(jnp.float32) for n in ("q", "k_win", "v_win", "cotangent")]
    ref, ref_grads = with_vjp(attend("xla"), 3)(*f32)
    errors = {"out": relative_error(out, ref)}
    errors.update({f"d{n}": relative_error(g, r) for n, g, r in zip("qkv", grads, ref_grads, strict=True)})
    name = jnp.dtype(dtype).name
    return {
        "what": f"{implementation} window op, T={length}, Dk={dk}, Dv={dv}, w={window}, "
        f"{'packed' if packed else 'unpacked'}, {name} vs float32 xla",
        "errors": errors,
        "max_error": max(errors.values()),
        "finite": all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in (out, *grads)),
        "ok": max(errors.values()) < TOLERANCE[name],
    }


def check_nsa_op(length: int, dtype) -> dict:
    """``nsa_attention`` with the ``--override`` implementations against all-xla (the layer
    check cannot take a per-op mapping: the layer's config must stay hashable)."""
    geometry = {**PAPER, "num_selected": -(-length // PAPER["selection_block_size"])}
    x = op_inputs(length, *PAPER_DIMS, geometry, dtype, seed=3)

    def attend(implementation):
        return lambda *arrays: nsa_jax.nsa_attention(*arrays, **geometry, implementation=implementation)

    arrays = [x[k] for k in NSA_INPUTS]
    out, grads = with_vjp(attend(OVERRIDES), len(arrays))(*arrays, x["cotangent"])
    ref, ref_grads = with_vjp(attend("xla"), len(arrays))(*arrays, x["cotangent"])
    errors = {"out": relative_error(out, ref)}
    errors.update(
        {f"d{n}": relative_error(g, r) for n, g, r in zip(NSA_INPUTS, grads, ref_grads, strict=True)}
    )
    name = jnp.dtype(dtype).name
    finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in (out, *grads))
    return {
        "what": f"nsa_attention op with {OVERRIDES}, T={length}, {name}, n={geometry['num_selected']} "
        "(every block)",
        "defaults": chosen(x, geometry),
        "errors": errors,
        "max_error": max(errors.values()),
        "finite": finite,
        "ok": finite and max(errors.values()) < TOLERANCE[name],
    }


def check_part(args) -> list[dict]:
    cases = []
    if OVERRIDES:
        for dtype in (jnp.float32, jnp.bfloat16):
            cases.append(check_nsa_op(args.check_length, dtype))
            print("check:", json.dumps(cases[-1]), flush=True)
    for dtype, packed in ((jnp.float32, False), (jnp.bfloat16, False), (jnp.bfloat16, True)):
        cases.append(check_layer(dtype, packed, args.check_length, args.check_model_dim))
        print("check:", json.dumps(cases[-1]), flush=True)
    windows = [
        (192, 128, "pallas_triton", jnp.bfloat16, True),
        (192, 128, "pallas_triton", jnp.float32, False),
    ]
    if ON_GPU:
        windows += [(192, 128, "cudnn", jnp.bfloat16, False), (64, 128, "cudnn", jnp.bfloat16, False)]
    else:
        print("check: cuDNN window skipped (not on a GPU)", flush=True)
    for dk, dv, implementation, dtype, packed in windows:
        # An odd length: cuDNN pads to even, the kernels mask a partial tile.
        cases.append(check_window(args.check_length + 1, dk, dv, implementation, dtype, packed))
        print("check:", json.dumps(cases[-1]), flush=True)
    return cases


# ---------------------------------------------------------------------------- fla


def mean_pool(x: jax.Array, block: int) -> jax.Array:
    """``[B, T, H, D]`` to ``[B, T // block, H, D]`` block means (T a multiple of ``block``)."""
    batch, length, heads, dim = x.shape
    pooled = x.reshape(batch, length // block, block, heads, dim).astype(jnp.float32).mean(axis=2)
    return pooled.astype(x.dtype)


def ours_at_fla_settings(q, k, v, g_cmp, g_slc):
    gates = jnp.stack([g_cmp, g_slc, jnp.zeros_like(g_cmp)], axis=-1)
    k_cmp, v_cmp = mean_pool(k, FLA["block_length"]), mean_pool(v, FLA["block_length"])
    return nsa_jax.nsa_attention(
        q,
        k_cmp,
        v_cmp,
        k,
        v,
        k,
        v,
        gates,
        **FLA,
        window=1,
        branches=("compressed", "selected"),
        implementation=OVERRIDES or None,
    )


def fla_part(lengths: list[int], iters: int) -> list[dict]:
    try:
        import torch
        import triton
        from fla.ops.nsa import parallel_nsa
    except ImportError as err:
        print(f"fla: fla-core columns skipped, import failed: {err}", flush=True)
        torch = None
    rows = []
    for length in lengths:
        keys = jax.random.split(jax.random.key(length), 6)
        q_heads, kv_heads = HEADS["q_heads"], HEADS["kv_heads"]
        q = jax.random.normal(keys[0], (1, length, q_heads, FLA_DIM), jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, length, kv_heads, FLA_DIM), jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, length, kv_heads, FLA_DIM), jnp.bfloat16)
        g_cmp = jax.nn.sigmoid(jax.random.normal(keys[3], (1, length, q_heads))).astype(jnp.bfloat16)
        g_slc = jax.nn.sigmoid(jax.random.normal(keys[4], (1, length, q_heads))).astype(jnp.bfloat16)
        ct = jax.random.normal(keys[5], (1, length, q_heads, FLA_DIM), jnp.bfloat16)
        n = iterations(length, iters)
        fwd = jax.jit(ours_at_fla_settings)
        row = {"T": length, "ours": {"fwd_ms": time_jax(fwd, q, k, v, g_cmp, g_slc, iters=n)}}
        row["ours"]["fwd_bwd_ms"] = time_jax(
            with_vjp(ours_at_fla_settings, 5), q, k, v, g_cmp, g_slc, ct, iters=n
        )
        if torch is not None:
            row["fla"] = time_fla(torch, triton, parallel_nsa, (q, k, v, g_cmp, g_slc, ct), iters)
            fla_out = row["fla"].pop("out")
            row["fla"]["rel_err_vs_ours"] = relative_error(fla_out, fwd(q, k, v, g_cmp, g_slc))
        print("fla:", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def time_fla(torch, triton, parallel_nsa, arrays, iters: int) -> dict:
    tq, tk, tv, tg_cmp, tg_slc, tct = (torch.from_dlpack(a).clone() for a in arrays)
    leaves = [tq, tk, tv, tg_cmp, tg_slc]
    for t in leaves:
        t.requires_grad_(True)

    def fwd():
        return parallel_nsa(
            tq,
            tk,
            tv,
            g_cmp=tg_cmp,
            g_slc=tg_slc,
            block_counts=FLA["num_selected"],
            block_size=FLA["selection_block_size"],
            window_size=0,
        )

    def fwd_bwd():
        fwd().backward(tct)

    with torch.no_grad():
        out = fwd()
        fwd_ms = triton.testing.do_bench(fwd, warmup=50, rep=max(200, iters * 30), return_mode="median")
    fwd_bwd_ms = triton.testing.do_bench(
        fwd_bwd, warmup=50, rep=max(300, iters * 80), grad_to_none=leaves, return_mode="median"
    )
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "out": jnp.asarray(out.float().cpu().numpy())}


# ---------------------------------------------------------------------------- time


def add_branch_inputs(x: dict, implementations: dict[str, str]) -> None:
    """Adds to :func:`op_inputs`' ``x`` the branch inputs that come from earlier branches in
    ``nsa_attention``, computed once with ``implementations`` (op -> name): ``lse`` float32
    ``[B, T, HQ]`` of the compressed attention and ``block_indices`` int32 ``[B, T, H, n]`` of
    select_blocks on it (paper geometry)."""
    compressed_kw = {k: PAPER[k] for k in ("block_length", "block_stride")}
    x["lse"] = jax.jit(
        lambda q, k, v: nsa_jax.compressed_attention(
            q, k, v, **compressed_kw, implementation=implementations["compressed_attention"]
        )[1]
    )(x["q"], x["k_cmp"], x["v_cmp"])
    selection = {k: PAPER[k] for k in SELECTION_KEYS}
    x["block_indices"] = jax.jit(
        lambda q, k, lse: nsa_jax.select_blocks(
            q, k, lse, **selection, implementation=implementations["select_blocks"]
        )
    )(x["q"], x["k_cmp"], x["lse"])


def branch_fns(x: dict, geometry: dict) -> dict[str, tuple[Callable, tuple, int]]:
    """Per-op ``(fn(implementation) -> callable, args, differentiable arg count)``."""
    compressed_kw = {k: geometry[k] for k in ("block_length", "block_stride")}
    selection = {k: geometry[k] for k in SELECTION_KEYS}
    return {
        "compressed_attention": (
            lambda impl: (
                lambda q, k, v: nsa_jax.compressed_attention(q, k, v, **compressed_kw, implementation=impl)[0]
            ),
            (x["q"], x["k_cmp"], x["v_cmp"]),
            3,
        ),
        "select_blocks": (
            lambda impl: lambda q, k, lse: nsa_jax.select_blocks(q, k, lse, **selection, implementation=impl),
            (x["q"], x["k_cmp"], x["lse"]),
            0,
        ),
        "selected_attention": (
            lambda impl: (
                lambda q, k, v, idx: nsa_jax.selected_attention(
                    q, k, v, idx, block_size=geometry["selection_block_size"], implementation=impl
                )
            ),
            (x["q"], x["k_slc"], x["v_slc"], x["block_indices"]),
            3,
        ),
        "sliding_window_attention": (
            lambda impl: (
                lambda q, k, v: nsa_jax.sliding_window_attention(
                    q, k, v, window=geometry["window"], implementation=impl
                )
            ),
            (x["q"], x["k_win"], x["v_win"]),
            3,
        ),
    }


def time_pair(fn: Callable, args: tuple, num_diff: int, cotangent, iters: int) -> dict:
    out = {"fwd_ms": time_jax(jax.jit(fn), *args, iters=iters)}
    if num_diff:
        out["fwd_bwd_ms"] = time_jax(with_vjp(fn, num_diff), *args, cotangent, iters=iters)
    return out


def nsa_op(*arrays: jax.Array) -> jax.Array:
    """``nsa_attention`` on :data:`NSA_INPUTS` at the paper geometry, ``--override`` applied."""
    return nsa_jax.nsa_attention(*arrays, **PAPER, implementation=OVERRIDES or None)


def dense_peers(length: int, dk: int, dv: int) -> dict[str, tuple[Callable, tuple, jax.Array]]:
    """cuDNN dense causal attention at the op's length (GPU only), as ``(fn, (q, k, v), cotangent)``:
    ``cudnn_dense``, ``jax.nn.dot_product_attention`` at head dim ``max(Dk, Dv)`` (it needs
    ``Dv == Dk``); and where ``Dk != Dv``, ``cudnn_dense_native_dv``, cuDNN's own ``Dv != Dk`` path
    (through jax's cuDNN module, as :mod:`nsa_jax.cudnn`), the faster peer at those dims
    (:func:`experiments.plot_benchmarks.dense_peer_name` takes it when present)."""
    width = max(dk, dv)
    dense = op_inputs(length, width, width, PAPER, seed=1)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    peers = {"cudnn_dense": (cudnn, (dense["q"], dense["k_slc"], dense["v_slc"]), dense["cotangent"])}
    if dk != dv:

        def cudnn_native(q, k, v):
            return nsa_cudnn.cudnn_causal_attention(q, k, v, dk**-0.5, False)

        narrow = (dense["q"][..., :dk], dense["k_slc"][..., :dk], dense["v_slc"][..., :dv])
        peers["cudnn_dense_native_dv"] = (cudnn_native, narrow, dense["cotangent"][..., :dv])
    return peers


def time_config(length: int, dk: int, dv: int, iters: int, alternatives: bool) -> dict:
    x = op_inputs(length, dk, dv, PAPER)
    n = iterations(length, iters)
    row = {"T": length, "Dk": dk, "Dv": dv, "defaults": chosen(x, PAPER), "ops": {}}
    row["nsa"] = time_pair(nsa_op, tuple(x[k] for k in NSA_INPUTS), len(NSA_INPUTS), x["cotangent"], n)
    add_branch_inputs(x, row["defaults"])
    candidates = native_candidates(x, PAPER) if alternatives else {}
    for op, (make, args, num_diff) in branch_fns(x, PAPER).items():
        names = [row["defaults"][op]] + [c for c in candidates.get(op, []) if c != row["defaults"][op]]
        row["ops"][op] = {}
        for name in names:
            slow = name == "xla" and op == "selected_attention" and length > XLA_SELECTED_MAX_LENGTH
            if slow and name != row["defaults"][op]:
                row["ops"][op][name] = {
                    "skipped": f"xla selected attention timed up to {XLA_SELECTED_MAX_LENGTH}"
                }
                continue
            row["ops"][op][name] = time_pair(make(name), args, num_diff, x["cotangent"], n)
    branch_outs = [x["cotangent"]] * 3  # any [B, T, HQ, Dv] arrays: combine's cost does not depend on values
    row["combine"] = time_pair(combine_branches, (x["gates"], *branch_outs), 4, x["cotangent"], n)
    if ON_GPU:
        for name, (fn, args, cotangent) in dense_peers(length, dk, dv).items():
            row[name] = time_pair(fn, args, 3, cotangent, n)
        row["cudnn_dense"]["head_dim"] = max(dk, dv)
    return row


def time_part(
    lengths: list[int], iters: int, start: float, budget_s: float, alternatives_at: list[int]
) -> list[dict]:
    rows = []
    if not ON_GPU:
        print("time: cuDNN dense columns skipped (not on a GPU)", flush=True)
    for length in lengths:
        for name, (dk, dv) in HEAD_DIMS.items():
            if time.perf_counter() - start > budget_s:
                rows.append({"T": length, "config": name, "skipped": f"time budget {budget_s} s spent"})
                print("time: skipped", rows[-1], flush=True)
                continue
            alternatives = name == "Dk192_Dv128" and length in alternatives_at
            row = time_config(length, dk, dv, iters, alternatives=alternatives)
            row["config"] = name
            rows.append(row)
            print("time:", json.dumps(row), flush=True)
    return rows


def window_part(lengths: list[int], iters: int) -> list[dict]:
    rows = []
    for length in lengths:
        x = op_inputs(length, *PAPER_DIMS, PAPER)
        segment_ids = packed_rows(length)
        row = {"T": length, "Dk": PAPER_DIMS[0], "Dv": PAPER_DIMS[1], "segments": 4, "implementations": {}}
        for name in native_candidates(x, PAPER, segment_ids)["sliding_window_attention"]:

            def attend(q, k, v, segments, name=name):
                return nsa_jax.sliding_window_attention(
                    q, k, v, window=PAPER["window"], segment_ids=segments, implementation=name
                )

            args = (x["q"], x["k_win"], x["v_win"], segment_ids)
            row["implementations"][name] = time_pair(
                attend, args, 3, x["cotangent"], iterations(length, iters)
            )
        rows.append(row)
        print("window:", json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------- report


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def speedup(peer: dict, nsa: dict) -> str:
    """``peer / nsa`` time ratios, forward / forward+backward (``-`` without a peer)."""
    if not peer:
        return "-"
    return f"{peer['fwd_ms'] / nsa['fwd_ms']:.2f}x / {peer['fwd_bwd_ms'] / nsa['fwd_bwd_ms']:.2f}x"


def markdown(report: dict) -> str:
    heads = report["heads"]
    lines = [
        "# NSA attention op and layer (bf16 unless noted)",
        "",
        f"Device: {report['device']}; jax {report['jax']}; command: `{report['command']}`; "
        f"wall {report['wall_s']:.0f} s.",
        "",
    ]
    memory = report.get("memory")
    if memory and "peak_bytes_in_use" in memory:
        lines += [
            f"Memory: one NativeSparseAttention layer, T={memory['T']}, model_dim={memory['model_dim']}, "
            f"fwd+bwd: peak {memory['peak_bytes_in_use'] / 2**30:.2f} GiB "
            f"({memory['peak_minus_before'] / 2**30:.2f} GiB above the "
            f"{memory['bytes_in_use_before'] / 2**30:.2f} GiB of parameters and inputs; peak after "
            f"compiling, before running: {memory['peak_after_compile'] / 2**30:.2f} GiB; XLA temp buffer "
            f"{(memory['xla_temp_bytes'] or 0) / 2**30:.2f} GiB); defaults {memory['defaults']}.",
            "",
        ]
    elif memory:
        lines += [f"Memory: {memory}", ""]
    if report.get("check"):
        lines += ["| check | max rel err | all-xla same dtype, max rel err | ok |", "|---|---|---|---|"]
        for case in report["check"]:
            xla = case.get("xla_same_dtype_errors")
            xla_max = "-" if not xla else f"{max(xla.values()):.2e}"
            lines.append(
                f"| {case['what']} | {case['max_error']:.2e} | {xla_max} | {'yes' if case['ok'] else 'NO'} |"
            )
        lines.append("")
    if report.get("fla"):
        lines += [
            f"fla-core settings (l=l'=d=64, mean pooling, n=16, window 0, HQ={heads['q_heads']}, "
            f"H={heads['kv_heads']}, D={report['fla_head_dim']}), ms:",
            "",
            "| T | ours fwd | ours fwd+bwd | fla fwd | fla fwd+bwd | f+b fla/ours | rel err vs fla |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sorted(report["fla"], key=lambda r: r["T"]):
            o, f = row["ours"], row.get("fla", {})
            ratio = f"{f['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}x" if f else "-"
            lines.append(
                f"| {row['T']} | {fmt(o['fwd_ms'])} | {fmt(o['fwd_bwd_ms'])} | {fmt(f.get('fwd_ms'))} "
                f"| {fmt(f.get('fwd_bwd_ms'))} | {ratio} | {fmt(f.get('rel_err_vs_ours'))} |"
            )
        lines.append("")
    if report.get("window"):
        lines += [
            "Window op alone on packed rows (4 segments; cuDNN takes none), Dk/Dv 192/128, w=512, bf16, "
            "B=1, ms:",
            "",
            "| T | implementation | fwd | fwd+bwd |",
            "|---|---|---|---|",
        ]
        for row in report["window"]:
            for name, t in row["implementations"].items():
                lines.append(f"| {row['T']} | {name} | {fmt(t['fwd_ms'])} | {fmt(t['fwd_bwd_ms'])} |")
        lines.append("")
    rows = sorted((r for r in report.get("time", []) if "skipped" not in r), key=lambda r: r["T"])
    if rows:
        lines += [
            f"Paper configuration (l=32, d=16, l'=64, n=16, w=512, HQ={heads['q_heads']}, "
            f"H={heads['kv_heads']}), B=1, ms, fwd / fwd+bwd; "
            "branches timed alone with the default implementations:",
            "",
            "| T | Dk/Dv | NSA | compressed | select_blocks (fwd) | selected | window | combine "
            "| sum of parts | cuDNN dense (D=max(Dk,Dv)) | dense/NSA | cuDNN dense, Dk/Dv as NSA "
            "| that dense/NSA |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            parts = [row["ops"][op][row["defaults"][op]] for op in OPS] + [row["combine"]]
            fwd_sum = sum(p["fwd_ms"] for p in parts)
            bwd_sum = sum(p.get("fwd_bwd_ms", p["fwd_ms"]) for p in parts)
            dense = row.get("cudnn_dense", {})

            def pair(p):
                return f"{fmt(p.get('fwd_ms'))} / {fmt(p.get('fwd_bwd_ms'))}"

            nsa = row["nsa"]
            native = row.get("cudnn_dense_native_dv", {})
            cells = [str(row["T"]), f"{row['Dk']}/{row['Dv']}", pair(nsa), *(pair(p) for p in parts)]
            cells += [
                f"{fmt(fwd_sum)} / {fmt(bwd_sum)}",
                pair(dense),
                speedup(dense, nsa),
                pair(native),
                speedup(native, nsa),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Implementations used: {rows[0]['defaults']}.",
            "",
            "Every native implementation, paper head dims (ms):",
            "",
        ]
        lines += ["| T | op | implementation | fwd | fwd+bwd |", "|---|---|---|---|---|"]
        for row in rows:
            if row["config"] != "Dk192_Dv128":
                continue
            for op, timings in row["ops"].items():
                for name, t in timings.items():
                    cells = [str(row["T"]), op, name, fmt(t.get("fwd_ms")), fmt(t.get("fwd_bwd_ms"))]
                    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="folder for layer.json and layer.md")
    # Longest first: if --budget-s runs out, the short lengths are the ones skipped.
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 32768, 16384, 8192])
    parser.add_argument(
        "--override",
        default="",
        help="op=implementation[,op=implementation] used instead of the defaults in the fla and time parts",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--iters", type=int, default=10, help="timed calls (halved from 32K, at least 3)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no new time rows after this")
    parser.add_argument(
        "--alternatives-at",
        type=int,
        nargs="*",
        default=[65536, 16384, 1024],
        help="lengths at which every native implementation is timed (paper head dims)",
    )
    parser.add_argument("--memory-length", type=int, default=65536)
    parser.add_argument("--model-dim", type=int, default=4096, help="layer width for the memory part")
    # Not a multiple of l, d or l'; smaller on CPU, where the check is a smoke test.
    parser.add_argument("--check-length", type=int, default=4050 if ON_GPU else 300)
    parser.add_argument("--check-model-dim", type=int, default=1024 if ON_GPU else 256)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print("MEMORY " + json.dumps(memory_child(args.memory_length, args.model_dim)), flush=True)
        return 0
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"--parts must be a comma-separated subset of {PARTS}, got {args.parts!r}")
    for item in filter(None, args.override.split(",")):
        op, _, name = item.partition("=")
        registry.get(op, name)  # raises ValueError naming an unknown op or implementation
        OVERRIDES[op] = name
    start = time.perf_counter()
    report = {
        "overrides": dict(OVERRIDES),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "command": "PYTHONPATH=$PWD python3 " + " ".join(sys.argv),
        "heads": HEADS,
        "fla_head_dim": FLA_DIM,
    }

    def save() -> None:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "layer.json"), "w") as f:
                json.dump(report, f, indent=1)

    if "memory" in parts:
        report["memory"] = memory_part(args)
        save()
    if "check" in parts:
        report["check"] = check_part(args)
        save()
    if "fla" in parts:
        report["fla"] = fla_part(args.lengths, args.iters)
        save()
    if "time" in parts:
        report["time"] = time_part(args.lengths, args.iters, start, args.budget_s, args.alternatives_at)
        save()
    if "window" in parts:
        report["window"] = window_part(args.lengths, args.iters)
    report["wall_s"] = time.perf_counter() - start
    save()
    text = markdown(report)
    if args.out:
        with open(os.path.join(args.out, "layer.md"), "w") as f:
            f.write(text)
    print(text)
    failed = [c["what"] for c in report.get("check", []) if not c["ok"]]
    if failed:
        print("CHECK FAILED:", failed, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
