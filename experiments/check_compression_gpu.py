"""GPU check and timing of compressed attention (Pallas kernels or cuDNN) and the select_blocks Pallas kernel.

Run on the H200 from the repo root::

    PYTHONPATH=$PWD python3 experiments/check_compression_gpu.py --out $OUT [--check-only]
        [--time-only] [--lengths 8192 65536] [--configs D192_128 D128] [--no-xla] [--iters 10]
        [--tuning fwd_rows=64 fwd_keys=64 ...] [--sweep] [--select-only]
        [--implementation pallas_triton|cudnn]

1. Correctness (spec, "Compression branch (Eqs. 7-8)" and "Selection scores"), fresh random
   inputs at odd sizes, G in {1, 4, 16}, packed segments, bf16 and float32: ``--implementation``
   (``pallas_triton``, or ``cudnn``, which skips the packed and float32 cases it does not serve)
   against the ``xla`` reference run in float32 (HIGHEST) on the same upcast inputs.
   Compressed attention: relative error ``||x - ref|| / ||ref||`` of ``out``, of ``lse`` (rows
   that see something; the ``-inf`` rows must match exactly) and of dq, dk_cmp, dv_cmp (a random
   cotangent on ``out`` and on ``lse``). Bounds: float32 1e-3, bf16 1e-2.
   select_blocks: both implementations get the same inputs and the same (xla) lse; indices must
   be equal, except where the reference importances of the differing blocks are within 1e-5
   (relative) of each other (a near-tie that float rounding may order either way; counted and
   reported). A case with exact ties (periodic compressed keys) must match exactly.
2. Timing at B=1, HQ=64, H=4, l=32, d=16, l'=64, n=16, bf16, Dk/Dv 192/128 and 128/128: median
   of ``--iters`` calls after a warm-up, ``block_until_ready``. Compressed attention forward and
   forward+backward (vjp in q, k_cmp, v_cmp) and select_blocks, ours and xla. The inputs are far
   larger than L2 except ``k_cmp``/``v_cmp``, which a real layer also reads from L2, so inputs
   are not rotated. Memory: XLA's compiled memory analysis of each timed function (temporary
   buffers plus outputs; arguments excluded).

``--sweep`` instead times only forward+backward of the candidate tunings in ``SWEEP`` (at
``--lengths``, ``--configs``; no checks), for picking the per-head-dim defaults of
``pallas_kernels/gpu/compressed.py``.

``--select-only`` runs only the select_blocks checks above, on the xla lse (no
compressed-attention checks or gradients). Its tunings and ablations are timed by
``experiments/bench_select_blocks.py``, which reuses these checks.

Prints a Markdown table last and writes ``compression_gpu.json`` (and ``.md``) into ``--out``.
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import nsa_jax
from experiments.measure import relative_error, time_jax
from nsa_jax import registry
from nsa_jax.reference.compressed import compression_probabilities
from nsa_jax.reference.selection import block_importance
from nsa_jax.segments import compressed_token_starts, num_compressed_slots, segment_starts
from pallas_kernels.gpu import compressed as compressed_kernels

TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-2}
NEAR_TIE = 1e-5
L, D, L_SEL, N = 32, 16, 64, 16
CONFIGS = {"D192_128": (192, 128), "D128": (128, 128)}

# (B, T, HQ, H, Dk, Dv, l, d, l', n, packed)
CASES = [
    (2, 1999, 16, 1, 128, 128, 32, 16, 64, 16, False),  # G = 16, odd T
    (1, 2100, 64, 4, 192, 128, 32, 16, 64, 16, True),  # paper heads and dims, packed
    (1, 1537, 16, 4, 64, 32, 32, 16, 64, 8, True),  # G = 4, packed
    (2, 777, 4, 4, 32, 16, 16, 8, 32, 6, False),  # G = 1, Dk != Dv, other geometry
    (1, 999, 4, 4, 192, 128, 32, 16, 64, 16, True),  # G = 1, paper dims, packed
    (1, 2050, 64, 4, 192, 128, 32, 16, 64, 16, False),  # paper heads and dims, one sequence
]


def packed_segments(batch: int, length: int) -> jax.Array:
    """int32 ``[B, T]``: three segments per row, boundaries not on block edges."""
    cuts = np.array([length // 3 + 5, 2 * length // 3 + 11])
    row = np.searchsorted(cuts, np.arange(length), side="right")
    return jnp.asarray(np.repeat(row[None], batch, 0), jnp.int32)


def compressed(implementation: str, geometry: dict, segment_ids):
    def fn(q, k, v):
        return nsa_jax.compressed_attention(
            q, k, v, **geometry, segment_ids=segment_ids, implementation=implementation
        )

    return fn


def selection(implementation: str, geometry: dict, segment_ids):
    def fn(q, k, lse):
        return nsa_jax.select_blocks(
            q, k, lse, **geometry, segment_ids=segment_ids, implementation=implementation
        )

    return fn


def values_and_grads(implementation: str, geometry: dict, segment_ids):
    """One jitted ``(q, k, v, ct, dlse) -> ((out, lse), (dq, dk, dv))``: one compile per side."""
    attend = compressed(implementation, geometry, segment_ids)

    def fn(q, k, v, ct, dlse):
        outs, vjp = jax.vjp(attend, q, k, v)
        return outs, vjp((ct, dlse))

    return jax.jit(fn)


def check_compressed(
    q, k, v, ct, dlse, geometry, segment_ids, name: str, implementation: str
) -> tuple[dict, jax.Array]:
    """Errors of ours against xla, and the xla lse (float32 ``[B, T, HQ]``) for select_blocks."""
    batch, length = q.shape[:2]
    # Rows that see a compressed token (spec, Eqs. 7-8): the lse cotangent is kept finite there only.
    ended = jnp.arange(length)[None] - segment_starts(segment_ids, batch, length)
    seen = np.asarray(ended >= geometry["block_length"] - 1)[:, :, None].repeat(q.shape[2], 2)
    dlse = jnp.where(jnp.asarray(seen), dlse, 0.0)
    (out, lse), grads = values_and_grads(implementation, geometry, segment_ids)(q, k, v, ct, dlse)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    (ref, ref_lse), ref_grads = values_and_grads("xla", geometry, segment_ids)(*f32, dlse)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    errors = {"out": relative_error(out, ref), "lse": relative_error(lse[seen], ref_lse[seen])}
    errors.update(
        {
            f"d{n}": relative_error(g, r)
            for n, g, r in zip(("q", "k_cmp", "v_cmp"), grads, ref_grads, strict=True)
        }
    )
    finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in (out, *grads))
    lse_pattern = bool(
        np.array_equal(np.isneginf(lse), ~seen) and np.array_equal(np.isneginf(ref_lse), ~seen)
    )
    ok = finite and lse_pattern and all(e < TOLERANCE[name] for e in errors.values())
    result = {"errors": errors, "finite": finite, "lse_inf_rows_match": lse_pattern, "ok": ok}
    return result, jnp.asarray(ref_lse)


def importance(q, k, lse, geometry: dict, segment_ids) -> np.ndarray:
    """Reference Eq. 9-10 importance ``[B, T, H, Nb]`` (float32), for judging near-ties."""
    batch, length = q.shape[:2]
    starts = segment_starts(segment_ids, batch, length)
    token_starts = compressed_token_starts(
        starts, k.shape[1], block_length=geometry["block_length"], block_stride=geometry["block_stride"]
    )
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    probs = compression_probabilities(
        q,
        lse,
        positions,
        starts,
        token_starts,
        k,
        block_length=geometry["block_length"],
        scale=q.shape[-1] ** -0.5,
    )
    return np.asarray(
        block_importance(
            probs,
            starts,
            num_kv_heads=k.shape[2],
            block_length=geometry["block_length"],
            block_stride=geometry["block_stride"],
            selection_block_size=geometry["selection_block_size"],
            num_blocks=-(-length // geometry["selection_block_size"]),
        )
    )


def check_selection(q, k, lse, geometry: dict, segment_ids, exact: bool) -> dict:
    ours = np.asarray(jax.jit(selection("pallas_triton", geometry, segment_ids))(q, k, lse))
    ref = np.asarray(jax.jit(selection("xla", geometry, segment_ids))(q, k, lse))
    rows = np.nonzero(np.any(ours != ref, axis=-1))
    near_ties = 0
    if len(rows[0]) and not exact:
        score = importance(q, k, lse, geometry, segment_ids)
        for b, t, h in zip(*rows, strict=True):
            ours_only = np.setdiff1d(ours[b, t, h], ref[b, t, h])
            ref_only = np.setdiff1d(ref[b, t, h], ours[b, t, h])
            if (
                len(ours_only)
                and len(ours_only) == len(ref_only)
                and min(ours_only.min(), ref_only.min()) >= 0
            ):
                values = np.concatenate([score[b, t, h, ours_only], score[b, t, h, ref_only]])
                near_ties += bool(np.ptp(values) <= NEAR_TIE * np.abs(values).max())
    mismatched = len(rows[0])
    return {
        "rows": int(np.prod(ref.shape[:3])),
        "mismatched_rows": mismatched,
        "near_tie_rows": near_ties,
        "ok": mismatched == near_ties,
    }


def run_case(case: tuple, dtype, ties: bool = False, implementation: str | None = "pallas_triton") -> dict:
    """Checks select_blocks, and the compressed attention ``implementation`` (``None``: not)."""
    batch, length, q_heads, kv_heads, dk, dv, l, d, lsel, n, packed = case
    keys = jax.random.split(jax.random.key(hash((case, ties)) % 2**31), 5)
    slots = num_compressed_slots(length, d)
    q = jax.random.normal(keys[0], (batch, length, q_heads, dk)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, slots, kv_heads, dk)).astype(dtype)
    if ties:
        # Every selection block sees the same Eq. 9 tokens: importances tie exactly.
        period = lsel // d
        k = jnp.tile(k[:, :period], (1, -(-slots // period), 1, 1))[:, :slots]
    v = jax.random.normal(keys[2], (batch, slots, kv_heads, dv)).astype(dtype)
    ct = jax.random.normal(keys[3], (batch, length, q_heads, dv)).astype(dtype)
    dlse = jax.random.normal(keys[4], (batch, length, q_heads))
    segment_ids = packed_segments(batch, length) if packed else None
    geometry = dict(block_length=l, block_stride=d)
    name = jnp.dtype(dtype).name
    result = {"case": list(case), "dtype": name, "ties": ties}
    served = implementation is not None and not ties
    if served:
        try:
            registry.resolve(
                "compressed_attention",
                implementation,
                q,
                k,
                v,
                **geometry,
                scale=dk**-0.5,
                segment_ids=segment_ids,
            )
        except ValueError as err:
            served = False
            result["compressed"] = {"skipped": str(err), "ok": True}
    if served:
        result["compressed"], lse = check_compressed(
            q, k, v, ct, dlse, geometry, segment_ids, name, implementation
        )
    else:
        _, lse = jax.jit(compressed("xla", geometry, segment_ids))(q, k, v)
    sel_geometry = dict(geometry, selection_block_size=lsel, num_selected=n)
    result["select_blocks"] = check_selection(q, k, lse, sel_geometry, segment_ids, exact=ties)
    result["ok"] = result["select_blocks"]["ok"] and result.get("compressed", {"ok": True})["ok"]
    return result


def run_checks(implementation: str | None = "pallas_triton") -> list[dict]:
    results = []
    todo = [(case, dtype, False) for case in CASES for dtype in (jnp.bfloat16, jnp.float32)]
    todo += [(CASES[0], jnp.bfloat16, True), (CASES[1], jnp.float32, True)]
    for case, dtype, ties in todo:
        start = time.perf_counter()
        r = run_case(case, dtype, ties, implementation)
        r["seconds"] = time.perf_counter() - start
        results.append(r)
        compressed_result = r.get("compressed", {})
        errs = " ".join(f"{k}={v:.2e}" for k, v in compressed_result.get("errors", {}).items())
        if "skipped" in compressed_result:
            errs = f"compressed skipped ({compressed_result['skipped'][:60]})"
        sel = r["select_blocks"]
        print(
            f"{'PASS' if r['ok'] else 'FAIL'} {r['dtype']:8s} {r['case']}{' ties' if ties else ''} {errs} "
            f"select_blocks mismatched rows {sel['mismatched_rows']}/{sel['rows']} "
            f"(near-ties {sel['near_tie_rows']}) ({r['seconds']:.0f} s)",
            flush=True,
        )
    return results


def memory_bytes(compiled) -> int | None:
    """Temporary plus output bytes of a compiled function (XLA's memory analysis)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def visible_compressed_tokens(length: int, block_length: int, block_stride: int) -> np.ndarray:
    """int64 ``[T]``: compressed tokens position ``t`` sees, those with ``i d + l - 1 <= t`` (spec,
    "Compression branch"): ``floor((t - l + 1) / d) + 1`` from ``t = l - 1``. The spec's closed form
    ``floor((t - l) / d) + 1`` gives one fewer where ``t - l + 1`` is a multiple of ``d``."""
    t = np.arange(length, dtype=np.int64)
    return np.where(t >= block_length - 1, (t - block_length + 1) // block_stride + 1, 0)


def compressed_pairs(length: int) -> int:
    """(query, visible compressed token) pairs of one head at this script's l and d."""
    return int(visible_compressed_tokens(length, L, D).sum())


def tuned(tuning: compressed_kernels.CompressedTuning | None, geometry: dict):
    """Our compressed attention with explicit tile sizes (bf16 timing of ``--tuning``, ``--sweep``);
    ``None``: the kernel's default for the dtype and head dims."""

    def fn(q, k, v):
        return compressed_kernels.compressed_attention(
            q,
            k,
            v,
            **geometry,
            scale=q.shape[-1] ** -0.5,
            tuning=tuning,
            interpret=jax.default_backend() != "gpu",
        )

    return fn


def candidate_tuning(config: str, overrides: dict) -> compressed_kernels.CompressedTuning | None:
    """The bf16 default tuning of ``config``'s head dims with ``overrides``; ``None`` when empty."""
    if not overrides:
        return None
    return dataclasses.replace(compressed_kernels.default_tuning(jnp.bfloat16, *CONFIGS[config]), **overrides)


def time_config(
    length: int,
    config: str,
    iters: int,
    with_xla: bool,
    overrides: dict | None = None,
    implementation: str = "pallas_triton",
) -> dict:
    dk, dv = CONFIGS[config]
    keys = jax.random.split(jax.random.key(length + dk), 4)
    slots = length // D
    q = jax.random.normal(keys[0], (1, length, 64, dk), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, slots, 4, dk), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, slots, 4, dv), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (1, length, 64, dv), jnp.bfloat16)
    geometry = dict(block_length=L, block_stride=D)
    sel_geometry = dict(geometry, selection_block_size=L_SEL, num_selected=N)
    flops = 2.0 * 64 * compressed_pairs(length) * (dk + dv)
    row = {"T": length, "config": config, "fwd_tflop": flops / 1e12}
    _, lse = jax.jit(compressed(implementation, geometry, None))(q, k, v)
    for impl in (implementation, "xla") if with_xla else (implementation,):
        attend = compressed(impl, geometry, None)
        if impl == "pallas_triton" and overrides:
            attend = tuned(candidate_tuning(config, overrides), geometry)
        fwd = jax.jit(attend)
        fwd_bwd = jax.jit(
            lambda q, k, v, ct, attend=attend: jax.vjp(lambda *a: attend(*a)[0], q, k, v)[1](ct)
        )
        select = jax.jit(selection("xla" if impl == "xla" else "pallas_triton", sel_geometry, None))
        xla = impl == "xla"
        n = max(2, iters // 4) if xla else iters
        for label, fn, args in (
            ("fwd", fwd, (q, k, v)),
            ("fwd_bwd", fwd_bwd, (q, k, v, ct)),
            ("select", select, (q, k, lse)),
        ):
            key = f"{'xla' if xla else 'ours'}_{label}"
            try:
                compiled = fn.lower(*args).compile()
                row[f"{key}_bytes"] = memory_bytes(compiled)
                row[f"{key}_ms"] = time_jax(compiled, *args, iters=n, warmup=1)
            except Exception as err:  # an xla OOM is a result, not a crash
                if not xla:
                    raise
                row[f"{key}_ms"] = None
                row[f"{key}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    row["ours_fwd_tflops"] = flops / row["ours_fwd_ms"] / 1e9
    row["ours_fwd_bwd_tflops"] = 3.5 * flops / row["ours_fwd_bwd_ms"] / 1e9
    return row


# Candidate tunings of --sweep per config: overrides of the kernel's bf16 default for the head
# dims (empty: the default). Registers for sm_90a at T = 64K after Triton's TTIR passes (as
# XLA compiles them): no spills unless named; "old" is the tiling before the wgmma change.
# Candidates as overrides of the table default (pallas_kernels/gpu/compressed.py); results of
# the first sweep, against the defaults of that time: experiments/results/compression_sweep_h200.md.
_OLD = dict(dq_rows=64, dq_keys=64, dkv_keys=32, dkv_rows=128, dkv_splits=1)
_TWO_STAGES = dict(fwd_stages=2, dq_stages=2, dkv_stages=2)
SWEEP = {
    "D192_128": {
        "default": {},
        "old": dict(_OLD, fwd_keys=64),
        "fwd_k64_dq_k32": dict(fwd_keys=64, dq_keys=32),
        "dkv_k64_r32_nosplit": dict(dkv_keys=64, dkv_rows=32, dkv_splits=1),
    },
    "D128": {
        "default": {},
        "old": dict(_OLD, **_TWO_STAGES),
        "stages2": _TWO_STAGES,
        "dkv_r64": dict(dkv_rows=64),
    },
}


def sweep_config(length: int, config: str, iters: int) -> list[dict]:
    """Forward+backward of each :data:`SWEEP` candidate of ``config`` (bf16), and its forward
    (timed once with the default tiles unless the candidate overrides ``fwd_*``).

    Each candidate's gradients are compared with the first candidate's (relative error, the
    largest of dq, dk_cmp, dv_cmp): the "old" tiling passed the GPU checks, so agreement
    within bf16 rounding vouches for the others at this size; above 1e-2 fails the sweep.
    """
    dk, dv = CONFIGS[config]
    keys = jax.random.split(jax.random.key(length + dk), 4)
    slots = length // D
    q = jax.random.normal(keys[0], (1, length, 64, dk), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, slots, 4, dk), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, slots, 4, dv), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (1, length, 64, dv), jnp.bfloat16)
    geometry = dict(block_length=L, block_stride=D)
    flops = 2.0 * 64 * compressed_pairs(length) * (dk + dv)
    default_fwd_ms = time_jax(jax.jit(tuned(None, geometry)), q, k, v, iters=iters, warmup=1)
    rows, first_grads = [], None
    for label, overrides in SWEEP[config].items():
        attend = tuned(candidate_tuning(config, overrides), geometry)
        fwd_ms = default_fwd_ms
        if any(name.startswith("fwd_") for name in overrides):
            fwd_ms = time_jax(jax.jit(attend), q, k, v, iters=iters, warmup=1)
        fwd_bwd = jax.jit(
            lambda q, k, v, ct, attend=attend: jax.vjp(lambda *a: attend(*a)[0], q, k, v)[1](ct)
        )
        start = time.perf_counter()
        compiled = fwd_bwd.lower(q, k, v, ct).compile()
        compile_s = time.perf_counter() - start
        ms = time_jax(compiled, q, k, v, ct, iters=iters, warmup=1)
        grads = compiled(q, k, v, ct)
        first_grads = first_grads or grads
        error = max(relative_error(g, r) for g, r in zip(grads, first_grads, strict=True))
        del grads
        rows.append(
            {
                "T": length,
                "config": config,
                "candidate": label,
                "overrides": overrides,
                "grad_error_vs_first": error,
                "ok": error < TOLERANCE["bfloat16"],
                "fwd_ms": fwd_ms,
                "fwd_bwd_ms": ms,
                "bwd_ms": ms - fwd_ms,
                "fwd_bwd_tflops": 3.5 * flops / ms / 1e9,
                "compile_s": compile_s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def select_markdown(report: dict) -> str:
    passed = sum(r["ok"] for r in report["checks"])
    return f"select_blocks checks: {passed}/{len(report['checks'])} passed.\n"


def fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def markdown(report: dict) -> str:
    lines = []
    if report.get("checks"):
        passed = sum(r["ok"] for r in report["checks"])
        lines += [f"Checks: {passed}/{len(report['checks'])} passed.", ""]
    if report.get("timings"):
        lines += [
            f"Times in ms (B=1, HQ=64, H=4, bf16, l=32, d=16, l'=64, n=16); ours = compressed attention"
            f" `{report['implementation']}`, select_blocks `pallas_triton`; memory = temp + outputs (GiB);"
            " TFLOP/s against 2*HQ*pairs*(Dk+Dv) forward, 3.5x that for fwd+bwd.",
            "",
            "| T | Dk/Dv | ours fwd | ours f+b | ours select | xla fwd | xla f+b | xla select"
            " | fwd TFLOP/s | f+b TFLOP/s | mem ours fwd / f+b / select | mem xla fwd / f+b / select |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["timings"]:
            lines.append(
                f"| {r['T']} | {r['config']} | {fmt(r['ours_fwd_ms'])} | {fmt(r['ours_fwd_bwd_ms'])}"
                f" | {fmt(r['ours_select_ms'])} | {fmt(r.get('xla_fwd_ms'))} | {fmt(r.get('xla_fwd_bwd_ms'))}"
                f" | {fmt(r.get('xla_select_ms'))} | {fmt(r['ours_fwd_tflops'], 0)}"
                f" | {fmt(r['ours_fwd_bwd_tflops'], 0)}"
                f" | {gib(r.get('ours_fwd_bytes'))} / {gib(r.get('ours_fwd_bwd_bytes'))}"
                f" / {gib(r.get('ours_select_bytes'))}"
                f" | {gib(r.get('xla_fwd_bytes'))} / {gib(r.get('xla_fwd_bwd_bytes'))}"
                f" / {gib(r.get('xla_select_bytes'))} |"
            )
    if report.get("sweep"):
        lines += [
            "",
            "Sweep of compressed-attention tunings (bf16; bwd = f+b - fwd):",
            "",
            "| T | Dk/Dv | candidate | fwd | f+b | bwd | f+b TFLOP/s | compile s | grad err vs first"
            " | overrides |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["sweep"]:
            overrides = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "table default"
            lines.append(
                f"| {r['T']} | {r['config']} | {r['candidate']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_bwd_ms'])}"
                f" | {fmt(r['bwd_ms'])} | {fmt(r['fwd_bwd_tflops'], 0)} | {fmt(r['compile_s'], 0)}"
                f" | {r['grad_error_vs_first']:.1e}{'' if r['ok'] else ' FAIL'} | {overrides} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for compression_gpu.json / .md")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--time-only", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--implementation",
        default="pallas_triton",
        choices=["pallas_triton", "cudnn"],
        help="compressed attention checked and timed as 'ours' (select_blocks: pallas_triton)",
    )
    parser.add_argument("--no-xla", action="store_true", help="time only the Pallas kernels")
    parser.add_argument(
        "--tuning",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="CompressedTuning overrides of the per-head-dim default for the timed (bf16) compressed"
        " attention",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="time forward+backward of the SWEEP candidate tunings per --configs and --lengths, nothing else",
    )
    parser.add_argument(
        "--select-only",
        action="store_true",
        help="only the select_blocks checks (xla lse, no compressed-attention checks)",
    )
    parser.add_argument(
        "--xla-max-length", type=int, default=65536, help="longest T at which the xla reference is timed"
    )
    args = parser.parse_args()
    report = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "command": "PYTHONPATH=$PWD python3 " + " ".join(sys.argv),
        "tolerance": TOLERANCE,
        "implementation": args.implementation,
        "checks": [],
        "timings": [],
        "sweep": [],
    }
    overrides = {k: int(v) for k, v in (item.split("=") for item in args.tuning)}
    report["tuning"] = {
        config: dataclasses.asdict(
            candidate_tuning(config, overrides)
            or compressed_kernels.default_tuning(jnp.bfloat16, *CONFIGS[config])
        )
        for config in args.configs
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "compression_gpu")

    def write(md: str | None = None) -> None:
        with open(path + ".json", "w") as f:
            json.dump(report, f, indent=1)
        if md is not None:
            with open(path + ".md", "w") as f:
                f.write(md)

    if args.select_only:
        report["checks"] = run_checks(implementation=None)
        md = select_markdown(report)
        write(md)
        print(md)
        return 0 if all(r["ok"] for r in report["checks"]) else 1
    if args.sweep:
        for length in args.lengths:
            for config in args.configs:
                report["sweep"] += sweep_config(length, config, args.iters)
                write()
        md = markdown(report)
        write(md)
        print(md)
        return 0 if all(r["ok"] for r in report["sweep"]) else 1
    if not args.time_only:
        report["checks"] = run_checks(args.implementation)
        write()
        if not all(r["ok"] for r in report["checks"]):
            print("FAILED checks: timing skipped", flush=True)
            write(markdown(report))
            return 1
    if not args.check_only:
        for length in args.lengths:
            for config in args.configs:
                with_xla = not args.no_xla and length <= args.xla_max_length
                row = time_config(length, config, args.iters, with_xla, overrides, args.implementation)
                report["timings"].append(row)
                print(json.dumps(row), flush=True)
                write()
    md = markdown(report)
    write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
