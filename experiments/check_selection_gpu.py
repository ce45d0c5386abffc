"""GPU correctness of the pallas_triton selected attention against the pure-JAX reference.

Run on the GPU from the repo root: ``PYTHONPATH=$PWD python3 experiments/check_selection_gpu.py``.
Relative error ``||out - ref|| / ||ref||`` of the output and of dq, dk, dv; the
reference runs in float32 (HIGHEST precision) on the same (upcast) inputs. Bounds:
float32 1e-3 (the kernel asks for full-precision float32 dots, which Triton runs as
IEEE fp32; the bound also admits TF32), bf16 1e-2. Prints one line per case and
a JSON summary; exits non-zero on any failure or NaN.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp

import nsa_jax
from experiments.selection_inputs import packed_segments, random_causal_indices

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


def relative_error(x: jax.Array, ref: jax.Array) -> float:
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def run_case(case: tuple, dtype) -> dict:
    batch, length, q_heads, kv_heads, dk, dv, block_size, slots, packed = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 5)
    q = jax.random.normal(keys[0], (batch, length, q_heads, dk)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dk)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dv)).astype(dtype)
    cotangent = jax.random.normal(keys[3], (batch, length, q_heads, dv)).astype(dtype)
    segment_ids = packed_segments(batch, length, (length // 3, length // 2 + 7)) if packed else None
    indices = random_causal_indices(keys[4], batch, length, kv_heads, slots, block_size, segment_ids)

    def attend(implementation):
        def fn(q, k, v):
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

    out, vjp = jax.vjp(attend("pallas_triton"), q, k, v)
    grads = vjp(cotangent)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_vjp = jax.vjp(attend("xla"), *f32)
    ref_grads = ref_vjp(cotangent.astype(jnp.float32))
    errors = {"out": relative_error(out, ref)}
    errors.update({f"d{n}": relative_error(g, r) for n, g, r in zip("qkv", grads, ref_grads, strict=True)})
    finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in (out, *grads))
    name = jnp.dtype(dtype).name
    ok = finite and all(e < TOLERANCE[name] for e in errors.values())
    return {"case": list(case), "dtype": name, "errors": errors, "finite": finite, "ok": ok}


def main() -> int:
    """Usage: ``check_selection_gpu.py [OUT_JSON] [CASE_INDEX ...]`` (default: all cases)."""
    picked = [int(i) for i in sys.argv[2:]] or range(len(CASES))
    results = []
    for case in (CASES[i] for i in picked):
        for dtype in (jnp.bfloat16, jnp.float32):
            start = time.perf_counter()
            r = run_case(case, dtype)
            r["seconds"] = time.perf_counter() - start
            results.append(r)
            errs = " ".join(f"{k}={v:.2e}" for k, v in r["errors"].items())
            verdict = "PASS" if r["ok"] else "FAIL"
            print(f"{verdict} {r['dtype']:8s} {r['case']} {errs} ({r['seconds']:.0f} s)", flush=True)
    summary = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "tolerance": TOLERANCE,
        "results": results,
    }
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
