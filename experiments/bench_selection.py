"""Times NSA selected attention on one GPU: our Pallas kernel against its peers.

Run from the repo root on the GPU (fla-core installed under PYTHONPATH for the
torch peer; it is skipped when missing)::

    PYTHONPATH=$PWD python3 experiments/bench_selection.py --out OUT_DIR --sweep    # ~2.5 min
    PYTHONPATH=$PWD python3 experiments/bench_selection.py --out OUT_DIR --table    # ~5 min

``--sweep``: at T=64K, G=16 D=128 and G=16 Dk=192/Dv=128 (``--configs``), (a) every
backward variant of :data:`VARIANTS` (or those named by ``--variants``)
forward+backward, with the relative difference of its gradients from the first
variant's, then (b) the backward's stages timed alone with the default launch
parameters (forward, delta, inverse map, the tile kernel in launch order and heavy
first, the dQ reduction by XLA and by the Pallas kernel; ``--no-components`` skips
them). ``--first-block`` makes every query select block 0 as well (the spec's top-n
always keeps the initial block), which puts T pairs on one key tile. Writes
``selection_sweep.json`` and ``.md`` after every step, so that a run cut short by its
time limit keeps what it measured.

``--table``: contenders, bf16, B=1, HQ=64, H=4 (G=16), D=128, n=16 blocks of 64, the same random
causal indices for all (``experiments.selection_inputs.random_causal_indices``):
``pallas_triton`` (ours), ``xla`` (the pure-JAX gather reference; forward+backward
only up to 16K), ``jax.nn.dot_product_attention(implementation="cudnn",
is_causal=True)`` dense, and fla-core ``ParallelNSAFunction`` (selection only).
Ours also at G=4 (HQ=16) and Dk=192/Dv=128, with the head-dim defaults of
``pallas_kernels.gpu.block_sizes.tuning_for`` unless ``--variant`` names one of
:data:`VARIANTS`. JAX: median of ``--iters`` timed calls after warm-up with
``block_until_ready``; torch: ``triton.testing.do_bench`` median.
Writes ``selection_h200.json`` and ``selection_h200.md`` to OUT_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

import nsa_jax
from experiments.measure import relative_error, time_jax
from experiments.selection_inputs import VARIANTS, random_causal_indices
from pallas_kernels.gpu import selection
from pallas_kernels.gpu.block_sizes import SelectionTuning, tuning_for
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


def make_inputs(
    length: int,
    q_heads: int,
    kv_heads: int,
    dk: int,
    dv: int,
    seed: int = 0,
    first_block: bool = False,
    previous_block: bool = False,
):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (1, length, q_heads, dk), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, length, kv_heads, dk), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, length, kv_heads, dv), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (1, length, q_heads, dv), jnp.bfloat16)
    indices = random_causal_indices(
        keys[4], 1, length, kv_heads, SLOTS, BLOCK, first_block=first_block, previous_block=previous_block
    )
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
    def fn(q, k, v, indices):  # the registry's path (tuning_for) when no tuning is given
        if tuning is None:
            return nsa_jax.selected_attention(
                q, k, v, indices, block_size=BLOCK, implementation="pallas_triton"
            )
        return selection.selected_attention(
            q, k, v, indices, block_size=BLOCK, scale=q.shape[-1] ** -0.5, tuning=tuning
        )

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


def variant_tuning(config: str, variant: str | None) -> SelectionTuning | None:
    """The named variant for ``config`` (G=4 takes the G=16 D=128 one); ``None``: ``tuning_for``."""
    if variant is None:
        return None
    return VARIANTS["G16_D192_128" if config == "G16_D192_128" else "G16_D128"].get(variant)


def bench_length(length: int, iters: int, with_fla: bool, variant: str | None) -> dict:
    tuning = variant_tuning("G16_D128", variant)
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
        mine = ours(variant_tuning(name, variant))
        row[f"ours_{name}"] = jax_pair(mine, q, k, v, ct, indices, iters, backward=True)
        row[f"ours_{name}"]["flops_fwd"] = forward_flops(length, q_heads, dk, dv)
    return row


def fwd_bwd_of(fn):
    """Jitted ``(q, k, v, ct, indices) -> (dq, dk, dv)`` through ``fn``'s forward and backward."""
    return jax.jit(lambda q, k, v, ct, i: jax.vjp(lambda q, k, v: fn(q, k, v, i), q, k, v)[1](ct))


def components(config: str, length: int, iters: int, first_block: bool) -> dict:
    """The backward's stages alone with the default tuning of the head dims, in ms.

    The tile kernel both in Triton and in Mosaic GPU (``mosaic_backward``), the Triton kernel's
    dQ parts summed by XLA and by the Pallas kernel (``dq_sum_kernel``), and the Mosaic kernel's
    list-ordered dQ rows summed.
    """
    q_heads, kv_heads, dk, dv = CONFIGS[config]
    q, k, v, ct, indices = make_inputs(length, q_heads, kv_heads, dk, dv, first_block=first_block)
    base = tuning_for(dk, dv)
    timings = {"tuning": dataclasses.asdict(base)}

    def geometry(tuning: SelectionTuning):
        return selection._Geometry(
            length=length,
            block_size=BLOCK,
            slots=SLOTS,
            group=q_heads // kv_heads,
            dk=dk,
            dv=dv,
            scale=dk**-0.5,
            aligned=True,
            dtype="bfloat16",
            interpret=False,
            tuning=tuning,
        )

    # Private stages of the custom_vjp, jitted one by one (each pays its own HBM round trip).
    geo = geometry(base)
    starts = selection.selected_key_starts(indices, None, BLOCK)
    forward = jax.jit(functools.partial(selection._forward, geo=geo))
    out, lse, _ = forward(q, k, v, starts)
    timings["fwd_ms"] = time_jax(forward, q, k, v, starts, iters=iters)
    delta_fn = jax.jit(functools.partial(selection._delta, geo=geo))
    delta = delta_fn(out, ct)
    timings["delta_ms"] = time_jax(delta_fn, out, ct, iters=iters)
    inverse = jax.jit(functools.partial(selection._inverse_map, geo=geo))
    entries, offsets = inverse(starts)
    timings["inverse_map_ms"] = time_jax(inverse, starts, iters=iters)
    del out
    kernel_args = (q, k, v, ct, starts, lse, delta, entries, offsets)
    variants = (("triton_", {"mosaic_backward": False}), ("mosaic_", {"mosaic_backward": True}))
    kernels = {}
    for label, changes in variants:
        kernels[label] = jax.jit(
            functools.partial(selection._tile_backward, geo=geometry(dataclasses.replace(base, **changes)))
        )
        timings[f"{label}kernel_ms"] = time_jax(kernels[label], *kernel_args, iters=iters)
    triton_parts = kernels["triton_"](*kernel_args)[2]
    for label, summed in (("xla", False), ("kernel", True)):
        parts_geo = geometry(dataclasses.replace(base, mosaic_backward=False, dq_sum_kernel=summed))
        finish = jax.jit(functools.partial(selection._finish_dq, geo=parts_geo))
        timings[f"dq_sum_{label}_ms"] = time_jax(finish, triton_parts, starts, entries, iters=iters)
    del triton_parts
    mosaic_rows = kernels["mosaic_"](*kernel_args)[2]
    finish = jax.jit(functools.partial(selection._finish_dq, geo=geometry(base)))
    timings["dq_sum_mosaic_rows_ms"] = time_jax(finish, mosaic_rows, starts, entries, iters=iters)
    print("components", config, length, timings, flush=True)
    return timings


def sweep(
    config: str,
    length: int,
    iters: int,
    names: list[str] | None,
    first_block: bool,
    report: dict,
    out_dir: str,
) -> None:
    """Forward+backward of the variants of ``VARIANTS[config]`` (all, or those in ``names``).

    Gradients are compared with the first variant run's; each result is appended to
    ``report["sweep"]`` and written at once.
    """
    q_heads, kv_heads, dk, dv = CONFIGS[config]
    q, k, v, ct, indices = make_inputs(length, q_heads, kv_heads, dk, dv, first_block=first_block)
    first = None
    for name, tuning in VARIANTS[config].items():
        if names is not None and name not in names:
            continue
        try:
            fwd_bwd = fwd_bwd_of(ours(tuning))
            grads = fwd_bwd(q, k, v, ct, indices)
            if first is None:
                first = grads
            pairs = zip("qkv", grads, first, strict=True)
            timing = {f"rel_diff_d{n}": relative_error(g, r) for n, g, r in pairs}
            del grads
            timing["fwd_bwd_ms"] = time_jax(fwd_bwd, q, k, v, ct, indices, iters=iters)
        except Exception as err:  # a variant that fails to compile must not end the sweep
            timing = {"error": repr(err)[:300]}
        report["sweep"].append({"config": config, "variant": name, **dataclasses.asdict(tuning), **timing})
        write(out_dir, "selection_sweep", report, sweep_markdown(report))
        print("sweep", config, length, name, timing, flush=True)


def sweep_markdown(report: dict) -> str:
    lines = [
        f"# Selected-attention backward at T={report['length']} (bf16, B=1, H=4, n=16 blocks of 64)",
        "",
        f"Device: {report['device']}; jax {report['jax']}; command: `{report['command']}`.",
        "Selections: random causal blocks, own block included"
        + ("; block 0 always selected (spec Eq. 11)." if report["first_block"] else "."),
        "",
        "Stages alone (ms; default tuning of the head dims; its tile kernel in Triton and in Mosaic GPU "
        "(each with its own splits); the Triton kernel's dQ parts summed by XLA or by the Pallas kernel; "
        "the Mosaic kernel's list-ordered dQ rows summed):",
        "",
        "| config | fwd | delta | inverse map | Triton kernel | Mosaic kernel | dQ sum XLA | dQ sum kernel "
        "| dQ rows sum |",
        "|" + "---|" * 9,
    ]
    for config, c in report["components"].items():
        keys = ("fwd_ms", "delta_ms", "inverse_map_ms", "triton_kernel_ms", "mosaic_kernel_ms")
        keys += ("dq_sum_xla_ms", "dq_sum_kernel_ms", "dq_sum_mosaic_rows_ms")
        lines.append(f"| {config} | " + " | ".join(fmt(c.get(key)) for key in keys) + " |")
    lines += [
        "",
        "Variants, forward+backward (ms); rel. diff: gradients against the config's first variant:",
        "",
        "| config | variant | warps | stages | rows | rows-major | split dims | dQ transposed | heavy first "
        "| splits | dQ sum kernel | Mosaic | fwd+bwd | rel diff dq/dk/dv | error |",
        "|" + "---|" * 15,
    ]
    for r in report["sweep"]:
        diffs = "/".join(f"{r[f'rel_diff_d{n}']:.1e}" for n in "qkv") if "rel_diff_dq" in r else "-"
        splits = r["bwd_splits"]
        if r["mosaic_backward"]:
            heavy = r.get("mosaic_heavy_tiles", 0)
            splits = f"{r['mosaic_splits']}" + (f" ({heavy} x {r['mosaic_heavy_splits']})" if heavy else "")
        lines.append(
            f"| {r['config']} | {r['variant']} | {r['bwd_warps']} | {r['bwd_stages']} | {r['bwd_rows']} "
            f"| {r['bwd_rows_major']} | {r['split_head_dims']} | {r['dq_transposed']} "
            f"| {r['bwd_heavy_first']} | {splits} "
            f"| {r['dq_sum_kernel']} | {r['mosaic_backward']} "
            f"| {fmt(r.get('fwd_bwd_ms'))} | {diffs} | {r.get('error', '')[:80]} |"
        )
    return "\n".join(lines) + "\n"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(report: dict) -> str:
    lines = [
        "# NSA selected attention on the H200 (bf16, B=1, HQ=64, H=4, D=128, n=16 blocks of 64)",
        "",
        f"Device: {report['device']}; jax {report['jax']}; command: `{report['command']}`.",
        f"Kernel launch parameters: {report['tuning']}.",
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


def write(out_dir: str, stem: str, report: dict, md: str | None = None) -> None:
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=1)
    if md is not None:
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(md)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="directory for the JSON and Markdown results")
    parser.add_argument("--sweep", action="store_true", help="stage timings and variant sweep")
    parser.add_argument("--table", action="store_true", help="the full table against the peers")
    parser.add_argument("--sweep-length", type=int, default=65536)
    parser.add_argument("--configs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--variants", nargs="+", default=None, help="sweep only these VARIANTS names")
    parser.add_argument("--no-components", action="store_true", help="sweep without the stage timings")
    parser.add_argument(
        "--first-block", action="store_true", help="sweep with block 0 always selected (one tile read by all)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--variant", default=None, help="a VARIANTS name for the table (default: tuning_for)")
    parser.add_argument("--no-fla", action="store_true")
    args = parser.parse_args()
    if not (args.sweep or args.table):
        parser.error("pass --sweep, --table or both")
    os.makedirs(args.out, exist_ok=True)
    base = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "command": "PYTHONPATH=$PWD python3 " + " ".join(sys.argv),
    }
    if args.sweep:
        report = {**base, "length": args.sweep_length, "first_block": args.first_block}
        report.update(components={}, sweep=[])
        for config in args.configs:
            iters = max(3, args.iters // 2)
            sweep(config, args.sweep_length, iters, args.variants, args.first_block, report, args.out)
        for config in [] if args.no_components else args.configs:
            report["components"][config] = components(config, args.sweep_length, args.iters, args.first_block)
            write(args.out, "selection_sweep", report, sweep_markdown(report))
        print(sweep_markdown(report))
    if args.table:
        report = {**base, "rows": [], "tuning": args.variant or "tuning_for(Dk, Dv)"}
        for length in args.lengths:
            row = bench_length(length, args.iters, not args.no_fla, args.variant)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            write(args.out, "selection_h200", report)
        write(args.out, "selection_h200", report, markdown(report))
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
