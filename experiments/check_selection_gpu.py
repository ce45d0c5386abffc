"""GPU correctness of the pallas_triton selected attention against the pure-JAX reference.

Run on the GPU from the repo root::

    PYTHONPATH=$PWD python3 experiments/check_selection_gpu.py --out OUT_DIR [--cases 0 3] [--no-variants]
        [--variants NAME ...] [--forced-blocks]

``--forced-blocks``: every selection holds block 0 and the block before the query's, besides the
query's own (Eq. 11's forced blocks), as :mod:`pallas_kernels.gpu.forced_merge` expects to find.

Relative error ``||out - ref|| / ||ref||`` of the output and of dq, dk, dv; the
reference runs in float32 (HIGHEST precision) on the same (upcast) inputs. Bounds:
float32 1e-3 (the kernel asks for full-precision float32 dots, which Triton runs as
IEEE fp32; the bound also admits TF32), bf16 1e-2. Every case runs in bf16 and
float32 through ``nsa_jax.selected_attention`` (the head-dim defaults of
``tuning_for``); the backward variants of ``experiments.selection_inputs.VARIANTS``
run in both dtypes on the first case and the packed-segment case (D=128 variants) and on
the Dk=192 case (the Mosaic variants run their Mosaic GPU tile kernel on the unpacked bf16
runs of G = 16 and the Triton one on the others).
Prints one line per run and writes ``check_selection_gpu.json``; exits non-zero on any
failure or NaN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

import nsa_jax
from experiments.measure import relative_error
from experiments.selection_inputs import VARIANTS, packed_segments, random_causal_indices
from pallas_kernels.gpu import selection

TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-2}

# (B, T, HQ, H, Dk, Dv, block_size, n, packed)
CASES = [
    (2, 999, 16, 1, 128, 128, 64, 8, False),  # G = 16, odd T
    (1, 777, 16, 4, 64, 64, 32, 6, False),  # G = 4
    (2, 513, 4, 4, 32, 16, 16, 5, False),  # G = 1, Dk != Dv
    (1, 1000, 32, 2, 192, 128, 64, 16, False),  # paper head dims
    (2, 901, 16, 4, 128, 128, 64, 8, True),  # packed segments, G = 4
    (1, 301, 8, 2, 24, 16, 8, 4, True),  # block size 8, Dk = 24
]
# Case index -> the VARIANTS config whose backward variants also run there.
VARIANT_CASES = {0: "G16_D128", 4: "G16_D128", 3: "G16_D192_128"}


def run_case(case: tuple, dtype, tunings: dict, forced: bool = False) -> list[dict]:
    """Errors of each ``tunings`` entry (name -> SelectionTuning, or None for the registry path);
    ``forced``: every selection holds block 0 and the two local blocks (Eq. 11)."""
    batch, length, q_heads, kv_heads, dk, dv, block_size, slots, packed = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 5)
    q = jax.random.normal(keys[0], (batch, length, q_heads, dk)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dk)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dv)).astype(dtype)
    cotangent = jax.random.normal(keys[3], (batch, length, q_heads, dv)).astype(dtype)
    segment_ids = packed_segments(batch, length, (length // 3, length // 2 + 7)) if packed else None
    indices = random_causal_indices(
        keys[4],
        batch,
        length,
        kv_heads,
        slots,
        block_size,
        segment_ids,
        first_block=forced,
        previous_block=forced,
    )

    def attend(implementation, tuning=None):
        def fn(q, k, v):
            if tuning is not None:
                return selection.selected_attention(
                    q,
                    k,
                    v,
                    indices,
                    block_size=block_size,
                    scale=dk**-0.5,
                    segment_ids=segment_ids,
                    tuning=tuning,
                )
            return nsa_jax.selected_attention(
                q,
                k,
                v,
                indices,
                block_size=block_size,
                segment_ids=segment_ids,
                implementation=implementation,
            )

        return fn

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_vjp = jax.vjp(attend("xla"), *f32)
    ref_grads = ref_vjp(cotangent.astype(jnp.float32))
    name = jnp.dtype(dtype).name
    results = []
    for label, tuning in tunings.items():
        start = time.perf_counter()
        out, vjp = jax.vjp(attend("pallas_triton", tuning), q, k, v)
        grads = vjp(cotangent)
        errors = {"out": relative_error(out, ref)}
        pairs = zip("qkv", grads, ref_grads, strict=True)
        errors.update({f"d{n}": relative_error(g, r) for n, g, r in pairs})
        finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in (out, *grads))
        ok = finite and all(e < TOLERANCE[name] for e in errors.values())
        seconds = time.perf_counter() - start
        results.append(
            {
                "case": list(case),
                "dtype": name,
                "variant": label,
                "errors": errors,
                "finite": finite,
                "ok": ok,
            }
        )
        errs = " ".join(f"{key}={value:.2e}" for key, value in errors.items())
        print(
            f"{'PASS' if ok else 'FAIL'} {name:8s} {list(case)} {label} {errs} ({seconds:.0f} s)", flush=True
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="directory for check_selection_gpu.json")
    parser.add_argument("--cases", type=int, nargs="+", default=list(range(len(CASES))))
    parser.add_argument("--no-variants", action="store_true", help="skip the backward variants")
    parser.add_argument("--variants", nargs="+", default=None, help="only these VARIANTS names")
    parser.add_argument(
        "--forced-blocks",
        action="store_true",
        help="every selection holds block 0 and the two local blocks, as the spec's top-n (Eq. 11)",
    )
    args = parser.parse_args()
    results = []
    for index in args.cases:
        for dtype in (jnp.bfloat16, jnp.float32):
            tunings = {"default": None}
            if index in VARIANT_CASES and not args.no_variants:
                chosen = VARIANTS[VARIANT_CASES[index]]
                wanted = chosen if args.variants is None else args.variants
                tunings.update({name: chosen[name] for name in wanted if name in chosen})
            results += run_case(CASES[index], dtype, tunings, forced=args.forced_blocks)
    summary = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "tolerance": TOLERANCE,
        "forced_blocks": args.forced_blocks,
        "results": results,
    }
    if args.out:
        with open(os.path.join(args.out, "check_selection_gpu.json"), "w") as f:
            json.dump(summary, f, indent=1)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} runs passed", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
