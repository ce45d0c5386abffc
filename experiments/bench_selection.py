"""Times NSA selected attention on one GPU: our Pallas kernel against its peers.

Run from the repo root on the GPU (fla-core installed under PYTHONPATH for the
torch peer; it is skipped when missing)::

    PYTHONPATH=$PWD python3 experiments/bench_selection.py OUT_DIR [--sweep] [--lengths 8192 ...]

Contenders, bf16, B=1, HQ=64, H=4 (G=16), D=128, n=16 blocks of 64, the same random
causal indices for all (``experiments.selection_inputs.random_causal_indices``):
``pallas_triton`` (ours), ``xla`` (the pure-JAX gather reference; forward+backward
only up to 16K), ``jax.nn.dot_product_attention(implementation="cudnn",
is_causal=True)`` dense, and fla-core ``ParallelNSAFunction`` (selection only).
Ours also at G=4 (HQ=16) and Dk=192/Dv=128. JAX: median of ``--iters`` timed calls
after warm-up with ``block_until_ready``; torch: ``triton.testing.do_bench`` median.
Writes ``selection_h200.json`` and ``selection_h200.md`` to OUT_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

import nsa_jax
from experiments.selection_inputs import random_causal_indices
from pallas_kernels.gpu import selection
from pallas_kernels.gpu.block_sizes import SelectionTuning
from pallas_kernels.gpu.inverse_map import build_inverse_map

BLOCK, SLOTS = 64, 16
CUDNN = os.environ.get("BENCH_DENSE_IMPLEMENTATION", "cudnn")  # "xla" for a CPU smoke run
CONFIGS = {  # name: (HQ, H, Dk, Dv)
    "G16_D128": (64, 4, 128, 128),
    "G4_D128": (16, 4, 128, 128),
    "G16_D192_128": (64, 4, 192, 128),
}


def forward_flops(length: int, q_heads: int, dk: int, dv: int) -> float:
    """Selection floor: ``HQ * T * n * l' * (Dk + Dv) * 2`` (backward counted as 2.5x)."""
    return q_heads * length * SLOTS * BLOCK * (dk + dv) * 2.0


def time_jax(fn, *args, iters: int) -> float:
    """Median milliseconds of ``iters`` calls after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_inputs(length: int, q_heads: int, kv_heads: int, dk: int, dv: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (1, length, q_heads, dk), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, length, kv_heads, dk), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, length, kv_heads, dv), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (1, length, q_heads, dv), jnp.bfloat16)
    indices = random_causal_indices(keys[4], 1, length, kv_heads, SLOTS, BLOCK)
    return q, k, v, ct, indices


def jax_pair(fn, q, k, v, ct, indices, iters: int, backward: bool) -> dict:
    """Times ``fn(q, k, v, indices)`` forward and, if asked, forward+backward (vjp in q, k, v)."""
    fwd = jax.jit(fn)
    out = {"fwd_ms": time_jax(fwd, q, k, v, indices, iters=iters)}
    if backward:
        fwd_bwd = jax.jit(lambda q, k, v, ct, i: jax.vjp(lambda q, k, v: fn(q, k, v, i), q, k, v)[1](ct))
        out["fwd_bwd_ms"] = time_jax(fwd_bwd, q, k, v, ct, indices, iters=iters)
    return out


def ours(tuning: SelectionTuning | None = None):
    scale = 128**-0.5

    def fn(q, k, v, indices):
        if tuning is None:
            return nsa_jax.selected_attention(
                q, k, v, indices, block_size=BLOCK, implementation="pallas_triton"
            )
        return selection.selected_attention(q, k, v, indices, block_size=BLOCK, scale=scale, tuning=tuning)

    return fn


def fla_contender(q, k, v, ct, indices, iters: int) -> dict:
    """fla-core selection only, on the same data (via dlpack) and indices."""
    try:
        import torch
        import triton
        from fla.ops.nsa.parallel import ParallelNSAFunction
    except ImportError as err:
        return {"skipped": f"import failed: {err}"}
    tq, tk, tv, tct = (torch.from_dlpack(x).clone() for x in (q, k, v, ct))
    for t in (tq, tk, tv):
        t.requires_grad_(True)
    ti = torch.from_dlpack(indices).long().contiguous()
    scale = q.shape[-1] ** -0.5

    def fwd():
        return ParallelNSAFunction.apply(tq, tk, tv, ti, SLOTS, BLOCK, scale, None)

    def fwd_bwd():
        fwd().backward(tct)

    with torch.no_grad():
        out = fwd()
        fwd_ms = triton.testing.do_bench(fwd, warmup=100, rep=max(200, iters * 30), return_mode="median")
    fb_ms = triton.testing.do_bench(
        fwd_bwd, warmup=100, rep=max(300, iters * 80), grad_to_none=[tq, tk, tv], return_mode="median"
    )
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "out": jnp.asarray(out.detach().float().cpu().numpy())}


def relative_error(x, ref) -> float:
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def bench_length(length: int, iters: int, with_fla: bool, tuning: SelectionTuning | None) -> dict:
    q_heads, kv_heads, dk, dv = CONFIGS["G16_D128"]
    q, k, v, ct, indices = make_inputs(length, q_heads, kv_heads, dk, dv)
    row = {"T": length, "flops_fwd": forward_flops(length, q_heads, dk, dv)}
    row["ours"] = jax_pair(ours(tuning), q, k, v, ct, indices, iters, backward=True)
    starts = selection.selected_key_starts(indices, None, BLOCK)
    inverse = jax.jit(lambda s: build_inverse_map(s, block_size=BLOCK, aligned=True))
    row["ours"]["inverse_map_ms"] = time_jax(inverse, starts, iters=iters)
    reference = lambda q, k, v, i: nsa_jax.selected_attention(
        q, k, v, i, block_size=BLOCK, implementation="xla"
    )
    row["xla"] = jax_pair(reference, q, k, v, ct, indices, max(3, iters // 3), backward=length <= 16384)
    cudnn = lambda q, k, v, i: jax.nn.dot_product_attention(q, k, v, implementation=CUDNN, is_causal=True)
    row["cudnn"] = jax_pair(cudnn, q, k, v, ct, indices, iters, backward=True)
    if with_fla:
        fla = fla_contender(q, k, v, ct, indices, iters)
        if "out" in fla:
            mine = jax.jit(ours(tuning))(q, k, v, indices)
            fla["max_rel_err_vs_ours"] = relative_error(fla.pop("out"), mine)
        row["fla"] = fla
    for name in ("G4_D128", "G16_D192_128"):
        q_heads, kv_heads, dk, dv = CONFIGS[name]
        q, k, v, ct, indices = make_inputs(length, q_heads, kv_heads, dk, dv, seed=1)
        row[f"ours_{name}"] = jax_pair(ours(tuning), q, k, v, ct, indices, iters, backward=True)
        row[f"ours_{name}"]["flops_fwd"] = forward_flops(length, q_heads, dk, dv)
    return row


def sweep(length: int, iters: int) -> tuple[list[dict], SelectionTuning]:
    """Launch parameters at one length (G=16, D=128); returns the timings and the best set.

    Forward variants are timed forward only; backward variants (with the default
    forward) forward+backward. The best of each half make the returned tuning.
    """
    q_heads, kv_heads, dk, dv = CONFIGS["G16_D128"]
    q, k, v, ct, indices = make_inputs(length, q_heads, kv_heads, dk, dv)
    forward_only = ((4, 2), (2, 2))
    backward = ((16, 4, 2), (16, 4, 3), (32, 4, 2), (32, 4, 3), (16, 8, 2), (32, 8, 2), (16, 2, 2))
    variants = [SelectionTuning(fwd_warps=w, fwd_stages=s) for w, s in forward_only]
    variants += [SelectionTuning(bwd_rows=r, bwd_warps=w, bwd_stages=s) for r, w, s in backward]
    results = []
    for tuning in variants:
        with_backward = len(results) >= len(forward_only)
        try:
            timing = jax_pair(ours(tuning), q, k, v, ct, indices, iters, backward=with_backward)
        except Exception as err:
            timing = {"error": repr(err)[:300]}
        results.append({**dataclasses.asdict(tuning), **timing})
        print("sweep", length, tuning, timing, flush=True)
    inf = float("inf")
    fwd = min(results[: len(forward_only)], key=lambda r: r.get("fwd_ms", inf))
    bwd = min(results[len(forward_only) :], key=lambda r: r.get("fwd_bwd_ms", inf))
    best = SelectionTuning(
        fwd_warps=fwd["fwd_warps"],
        fwd_stages=fwd["fwd_stages"],
        bwd_warps=bwd["bwd_warps"],
        bwd_stages=bwd["bwd_stages"],
        bwd_rows=bwd["bwd_rows"],
    )
    return results, best


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(report: dict) -> str:
    lines = [
        "# NSA selected attention on the H200 (bf16, B=1, HQ=64, H=4, D=128, n=16 blocks of 64)",
        "",
        f"Device: {report['device']}; jax {report['jax']}; command: `{report['command']}`.",
        f"Kernel launch parameters: {report.get('tuning', 'defaults')}.",
        "Times in ms (JAX: median of timed calls after warm-up; fla-core: `triton.testing.do_bench` median).",
        "TFLOP/s against the selection floor HQ*T*n*l'*(Dk+Dv)*2 forward, 3.5x that for forward+backward.",
        "",
        "| T | ours fwd | ours fwd+bwd | fla fwd | fla fwd+bwd | cuDNN fwd | cuDNN fwd+bwd | xla fwd "
        "| xla fwd+bwd | fwd vs fla | f+b vs fla | fwd vs cuDNN | f+b vs cuDNN "
        "| ours fwd TFLOP/s | ours f+b TFLOP/s |",
        "|" + "---|" * 15,
    ]
    for row in report["rows"]:
        o, c, x, f = row["ours"], row["cudnn"], row["xla"], row.get("fla", {})
        ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
        lines.append(
            f"| {row['T']} | {fmt(o['fwd_ms'])} | {fmt(o['fwd_bwd_ms'])} | {fmt(f.get('fwd_ms'))} "
            f"| {fmt(f.get('fwd_bwd_ms'))} | {fmt(c['fwd_ms'])} | {fmt(c['fwd_bwd_ms'])} "
            f"| {fmt(x['fwd_ms'])} | {fmt(x.get('fwd_bwd_ms'))} | {ratio(f.get('fwd_ms'), o['fwd_ms'])} "
            f"| {ratio(f.get('fwd_bwd_ms'), o['fwd_bwd_ms'])} | {ratio(c['fwd_ms'], o['fwd_ms'])} "
            f"| {ratio(c['fwd_bwd_ms'], o['fwd_bwd_ms'])} | {row['flops_fwd'] / o['fwd_ms'] / 1e9:.0f} "
            f"| {3.5 * row['flops_fwd'] / o['fwd_bwd_ms'] / 1e9:.0f} |"
        )
    lines += [
        "",
        "Ours at other shapes (ms; TFLOP/s against the floor):",
        "",
        "| T | config | fwd | fwd+bwd | fwd TFLOP/s | f+b TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for name in ("G4_D128", "G16_D192_128"):
            o = row[f"ours_{name}"]
            lines.append(
                f"| {row['T']} | {name} | {fmt(o['fwd_ms'])} | {fmt(o['fwd_bwd_ms'])} "
                f"| {o['flops_fwd'] / o['fwd_ms'] / 1e9:.0f} "
                f"| {3.5 * o['flops_fwd'] / o['fwd_bwd_ms'] / 1e9:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--sweep", type=int, default=0, help="length at which to sweep warps/stages")
    parser.add_argument("--no-fla", action="store_true")
    args = parser.parse_args()
    report = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "command": "PYTHONPATH=$PWD python3 " + " ".join(sys.argv),
        "rows": [],
    }
    tuning = None
    if args.sweep:
        report["sweep"], tuning = sweep(args.sweep, args.iters)
        report["tuning"] = dataclasses.asdict(tuning)
    for length in args.lengths:
        row = bench_length(length, args.iters, not args.no_fla, tuning)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out_dir, "selection_h200.json"), "w") as f:
            json.dump(report, f, indent=1)
    with open(os.path.join(args.out_dir, "selection_h200.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
