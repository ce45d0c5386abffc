"""Decode-step latency: NSA attention against dense attention, one run.

    python experiments/bench_decode.py --out experiments/results   # on the GPU
    python experiments/bench_decode.py --quick                      # tiny sizes, any backend

One step = one query token per sequence against a full cache of ``S`` tokens.
NSA (:func:`nsa_jax.decoding.decode_attention`): compressed attention and top-n
selection in XLA, the selected and window reads by the implementation named in the
row. Dense: ``jax.nn.dot_product_attention`` on a ``[B, S, H, 128]`` cache with cuDNN
and with XLA. Bytes are counted from the shapes: each key/value element a step must
read, once.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

import nsa_jax
from nsa_jax.decoding import NSACache, decode_attention
from nsa_jax.segments import num_compressed_slots

PAPER = dict(block_length=32, block_stride=16, selection_block_size=64, num_selected=16, window=512)


def time_call(fn, args_list, repeats: int) -> float:
    """Median milliseconds of ``fn(*args)`` cycling through ``args_list`` after a warm-up."""
    for args in args_list:
        jax.block_until_ready(fn(*args))
    times = []
    for i in range(repeats):
        args = args_list[i % len(args_list)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def nsa_bytes(batch: int, length: int, kv_heads: int, dk: int, dv: int, itemsize: int) -> int:
    cmp = (length - PAPER["block_length"]) // PAPER["block_stride"] + 1
    tokens = cmp + PAPER["num_selected"] * PAPER["selection_block_size"] + PAPER["window"]
    return batch * kv_heads * tokens * (dk + dv) * itemsize


def random_cache(key, batch, length, kv_heads, dk, dv, dtype) -> NSACache:
    keys = jax.random.split(key, 4)
    slots = num_compressed_slots(length, PAPER["block_stride"])
    return NSACache(
        keys=jax.random.normal(keys[0], (3, batch, length, kv_heads, dk), dtype),
        values=jax.random.normal(keys[1], (3, batch, length, kv_heads, dv), dtype),
        k_cmp=jax.random.normal(keys[2], (batch, slots, kv_heads, dk), dtype),
        v_cmp=jax.random.normal(keys[3], (batch, slots, kv_heads, dv), dtype),
        lengths=jnp.full((batch,), length, jnp.int32),
    )


def bench(batches, lengths, heads, kv_heads, dims, repeats, rotations) -> list[dict]:
    dtype = jnp.bfloat16
    gpu = jax.default_backend() == "gpu"
    rows = []
    implementations = nsa_jax.implementations("decode_selected_window")
    for batch in batches:
        for length in lengths:
            sets = rotations if batch == 1 else 1
            key = jax.random.key(length + batch)
            dense_sets = []
            for i in range(sets):
                kq, kk, kv = jax.random.split(jax.random.fold_in(key, i), 3)
                dense_sets.append(
                    (
                        jax.random.normal(kq, (batch, 1, heads, 128), dtype),
                        jax.random.normal(kk, (batch, length, kv_heads, 128), dtype),
                        jax.random.normal(kv, (batch, length, kv_heads, 128), dtype),
                    )
                )
            row = {"B": batch, "S": length, "dense_bytes": 2 * batch * length * kv_heads * 128 * 2}
            for impl in ("cudnn", "xla") if gpu else ("xla",):
                fn = jax.jit(
                    lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, implementation=impl)
                )
                row[f"dense_{impl}_ms"] = time_call(fn, dense_sets, repeats)
            del dense_sets
            for dk, dv in dims:
                caches = [
                    random_cache(jax.random.fold_in(key, 100 + i), batch, length, kv_heads, dk, dv, dtype)
                    for i in range(sets)
                ]
                queries = [
                    jax.random.normal(jax.random.fold_in(key, 200 + i), (batch, heads, dk), dtype)
                    for i in range(sets)
                ]
                tag = f"nsa_dk{dk}_dv{dv}"
                row[f"{tag}_bytes"] = nsa_bytes(batch, length, kv_heads, dk, dv, 2)
                outputs = {}
                for impl in implementations:
                    fn = jax.jit(lambda q, c, impl=impl: decode_attention(q, c, **PAPER, implementation=impl))
                    row[f"{tag}_{impl}_ms"] = time_call(fn, list(zip(queries, caches, strict=True)), repeats)
                    outputs[impl] = fn(queries[0], caches[0])
                reference = outputs["xla"]
                for impl, out in outputs.items():
                    errors = [
                        float(
                            jnp.linalg.norm((o - r).astype(jnp.float32))
                            / jnp.linalg.norm(r.astype(jnp.float32))
                        )
                        for o, r in zip(out, reference, strict=True)
                    ]
                    row[f"{tag}_{impl}_max_rel_err_vs_xla"] = max(errors)
                del caches
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], dims, command: str) -> str:
    device = jax.devices()[0].device_kind
    lines = [
        f"# NSA decode step vs dense decode ({device}, jax {jax.__version__}, bf16)",
        "",
        f"Command: `{command}`. Median of timed calls after warm-up (ms). HQ=64, H=4; NSA paper "
        "geometry (l=32, d=16, l'=64, n=16, w=512); dense D=128. Speed-up = best dense / NSA.",
        "",
    ]
    dense_cols = [c for c in ("cudnn", "xla") if f"dense_{c}_ms" in rows[0]]
    impls = list(nsa_jax.implementations("decode_selected_window"))
    header = ["B", "S"] + [f"dense {c}" for c in dense_cols]
    for dk, dv in dims:
        header += [f"NSA {dk}/{dv} {i}" for i in impls] + [f"speed-up {dk}/{dv}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        best_dense = min(r[f"dense_{c}_ms"] for c in dense_cols)
        cells = [str(r["B"]), f"{r['S'] // 1024}K"] + [f"{r[f'dense_{c}_ms']:.3f}" for c in dense_cols]
        for dk, dv in dims:
            times = [r[f"nsa_dk{dk}_dv{dv}_{i}_ms"] for i in impls]
            cells += [f"{t:.3f}" for t in times] + [f"{best_dense / min(times):.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Bytes per step counted from shapes (MB):", ""]
    lines += [
        "| B | S | dense | " + " | ".join(f"NSA {dk}/{dv}" for dk, dv in dims) + " |",
        "|---|---|---|" + "---|" * len(dims),
    ]
    for r in rows:
        nsa = " | ".join(f"{r[f'nsa_dk{dk}_dv{dv}_bytes'] / 1e6:.1f}" for dk, dv in dims)
        lines.append(f"| {r['B']} | {r['S'] // 1024}K | {r['dense_bytes'] / 1e6:.1f} | {nsa} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test on any backend")
    parser.add_argument("--out", type=pathlib.Path, help="directory for decode_<backend>.json and .md")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if args.quick:
        batches, lengths, repeats, dims = [1, 2], [1024, 2048], 3, [(192, 128)]
    else:
        batches, lengths, repeats, dims = (
            [1, 16],
            [8192, 16384, 32768, 65536],
            args.repeats,
            [(192, 128), (128, 128)],
        )
    rows = bench(batches, lengths, 64, 4, dims, repeats, rotations=4)
    command = "python experiments/bench_decode.py" + (" --quick" if args.quick else "")
    report = markdown(rows, dims, command)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"decode_{jax.default_backend()}"
        (args.out / f"{stem}.json").write_text(
            json.dumps(
                {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, indent=2
            )
        )
        (args.out / f"{stem}.md").write_text(report)


if __name__ == "__main__":
    main()
