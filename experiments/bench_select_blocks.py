"""GPU check and timing of the select_blocks Pallas kernel (Triton lowering): variants and ablations.

Run on the H200 from the repo root (about 3-4 minutes)::

    PYTHONPATH=$PWD python3 experiments/bench_select_blocks.py --out $OUT [--skip-checks]
        [--iters 10] [--budget 150] [--plan NAME]   # NAME: a key of PLAN (default full)

1. Checks (unless ``--skip-checks``), kernel against the ``xla`` reference on the same inputs and
   lse, with the rule of ``experiments/check_compression_gpu.py`` (indices equal except near ties,
   reference importances within 1e-5 of each other; exact-tie cases must match exactly): six of
   its cases with the default kernel (odd T, G = 16, 4, 1, packed, bf16 and float32, two exact-tie
   cases with periodic keys), its G = 16 exact-tie case with four other variants, then T = 64K,
   Dk = 192 with the default kernel (near ties judged on up to 256 mismatched rows).
2. Timing at B=1, HQ=64, H=4, l=32, d=16, l'=64, n=16, bf16, lse from our compressed forward:
   median ms of ``--iters`` calls after two warm-ups, per :data:`PLAN` entry ``(T, Dk, name)``,
   most informative first; entries past ``--budget`` seconds (timing part) are skipped and marked.
   A name is a :data:`VARIANTS` tuning (``first_kernel`` is the kernel before this change) or an
   :data:`ABLATIONS` entry (the default tuning without ``back_dot`` with one stage replaced, by
   patching the kernel module while tracing; its output is meaningless) or a :data:`REVERTS`
   entry (the default tuning with one change undone the same way, for an A/B in one process;
   its picks are compared like a variant's). Every variant's picks
   are compared with the default's at the same size: ``mismatched_rows`` must be 0 or a few near
   ties.

Writes ``select_blocks_bench.json`` (and ``.md``) into ``--out`` after every entry and prints a
Markdown table last. Exits non-zero when a check fails (timing still runs). ``--smoke`` runs it
all on the CPU in Pallas interpret mode at T / 64 (a test of the script, not of speed; there the
exact-tie checks of kernels with unmasked key tiles may fail: XLA compiles the masked and unmasked
loop bodies separately, and their float32 logits can differ in the last bit).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import check_compression_gpu as cc
from experiments.measure import time_jax
from nsa_jax.reference.compressed import compression_probabilities
from nsa_jax.reference.selection import block_importance
from nsa_jax.segments import compressed_token_starts
from pallas_kernels.gpu import select_blocks as kernel
from pallas_kernels.gpu.tiles import exp2_affine

L, D, L_SEL, N = 32, 16, 64, 16
GEOMETRY = dict(
    block_length=L,
    block_stride=D,
    selection_block_size=L_SEL,
    num_selected=N,
    num_initial_blocks=1,
    num_local_blocks=2,
)


def tuned(overrides: dict, q: jax.Array) -> kernel.SelectTuning:
    """The bf16 default tuning for ``q``'s ``Dk`` with ``overrides`` (a :data:`VARIANTS` entry)."""
    return dataclasses.replace(kernel.default_tuning(jnp.bfloat16, q.shape[-1], q.shape[1]), **overrides)


# SelectTuning overrides of the default. Registers for sm_90a at T = 64K, Dk = 192 / 128
# (experiments/kernel_resources.py, no spills), shared memory, and the CTAs an SM then holds.
# Every entry spells out the tiles it was measured with (experiments/results/select_blocks_h200.md);
# registers at Dk = 192 / 128 (kernel_resources), shared memory and programs an SM.
_WIDE = dict(rows=128, warps=8)
VARIANTS = {
    # The kernel's default: 64 rows, 4 warps, back_dot since session 8 (before it, 119 registers at
    # Dk = 128, 48 KB: 4 CTAs of 4 warps; P = 4), and since session 14 key tiles of 128 at
    # Dk <= 128 past T = 32K. The other entries inherit back_dot, and those keys, unless they say.
    "default": {},
    "keys64": dict(keys=64),  # the Dk <= 128 default before session 14 (12.1 against 10.4 ms at 64K)
    # 137 / 119, 72 / 48 KB: 3 / 4 CTAs; the default until session 8 (at Dk = 192 up to T = 32K)
    "rows64_warps4": dict(rows=64, warps=4, back_dot=False),
    "first_kernel": dict(_WIDE, quads=False, top_n="argmax", back_dot=False),  # 185 / 176: session 2
    "rows128_warps8": dict(_WIDE),  # 128 / 121, 96 / 64 KB: 2 / 2 CTAs of 8 warps; P = 8
    "rows256_warps16": dict(rows=256, warps=16, state=16384),  # 114 / 108, 144 / 96 KB: 1 CTA of 16
    "masked_only": dict(_WIDE, unmasked=False),  # 111 / 110: 2 / 2 CTAs of 8 warps
    "rows64_warps4_masked_only": dict(rows=64, warps=4, unmasked=False),  # 113 / 112: 3 / 4
    "rows256_warps16_masked_only": dict(rows=256, warps=16, state=16384, unmasked=False),  # 107 / 113
    "rows256_state16k": dict(rows=256, warps=8, state=16384),  # 235 / 225, 144 / 96 KB: 1 CTA; P = 16
    "keys128": dict(_WIDE, keys=128),  # 176 / 160, 144 / 96 KB: 1 / 1
    "keys32": dict(_WIDE, keys=32),  # 120 / 117, 72 / 48 KB: 2 / 2
    "stages3": dict(_WIDE, stages=3),  # 147 / 123, 120 / 80 KB: 1 / 2
    "top_n_lanes": dict(_WIDE, top_n="lanes"),  # 121 / 113: top-n on an [A, P, 32] view
    "quads_argmax": dict(_WIDE, top_n="argmax"),  # 128 / 115: new Eq. 9, the first kernel's top-n
    "by_token_lanes": dict(_WIDE, quads=False, top_n="lanes", back_dot=False),  # 145 / 114: first Eq. 9
    "by_token_lanes_rows64": dict(rows=64, warps=4, quads=False, top_n="lanes", back_dot=False),
    # Session 7, around the 64-row default (registers not read):
    "rows64_keys128": dict(rows=64, warps=4, keys=128),
    "rows64_keys32": dict(rows=64, warps=4, keys=32),
    "rows64_stages3": dict(rows=64, warps=4, stages=3),
    "rows64_warps8": dict(rows=64, warps=8),
    "rows32_warps2": dict(rows=32, warps=2),
    "rows32_warps4": dict(rows=32, warps=4),
    # Eq. 9's back terms from a second dot instead of a shifted second group sum: part of the
    # default since session 8 (Dk = 128: 12.1 against 16.3 ms at 64K; Dk = 192: 14.3 against 19.8).
    "back_dot": dict(back_dot=True),
    "no_back_dot": dict(back_dot=False),
    "rows64_back_dot": dict(rows=64, warps=4, back_dot=True),
    # Session 17: 128-key tiles with one stage (no prefetch buffer), 2 CTAs an SM at Dk = 192 where
    # two stages leave one (sm_90a: 252 registers, 56 KB against 251, 144 KB; the default 207, 84 KB).
    # Slower: 15.3-15.5 against 13.6-13.7 ms at 64K, Dk = 192 (experiments/results/session17_h200.md).
    "keys128_stages1": dict(keys=128, stages=1),
    "keys128_stages1_warps8": dict(keys=128, stages=1, warps=8),  # 255 registers: 1 CTA; 35.1 ms
    "stages1": dict(stages=1),  # Dk = 128's 128-key tiles with one stage: 11.3 against 9.4 ms
    # Session 24: 128-row tiles of 128 keys with one stage (sm_90a, triton 3.9: 244 registers, 80 KB):
    # 17.98-17.99 against 13.63-13.90 ms at 64K, Dk = 192 (plan "wide", before the tiled keys).
    "keys128_stages1_rows128": dict(_WIDE, keys=128, stages=1),
}


def _no_top_n(score, current, geo, view):
    """Top-n replaced by one reduction a position (keeps the importances alive)."""
    del current, view
    slot = jnp.arange(geo.picks_padded)[None, :]
    return jnp.where(slot == 0, (jnp.max(score, axis=1) > 0.5).astype(jnp.int32)[:, None], -1)


def _own_only(current, previous):
    """Eq. 9 without the terms of the block before (their token and group sums go dead)."""
    return jnp.zeros_like(current), previous


def _no_exp(logits, log2_scale, row_offset, flush):
    del flush
    return logits * log2_scale - row_offset[:, None]


def _logits_only(logits, log2_scale, row_offset, flush):
    del log2_scale, row_offset, flush
    return logits


def _one_sum(p, previous, geo):
    """Eq. 9 and the group sums replaced by one sum a position a key tile."""
    shape = (geo.positions, geo.tile_blocks)
    if p is None:
        return jnp.zeros(shape, jnp.float32), previous
    total = jnp.sum(p.reshape(geo.positions, geo.heads_pow2 * geo.keys), axis=1)
    return jnp.broadcast_to(total[:, None], shape), previous


# Default tuning with stages replaced (module attribute -> stand-in): T(default) - T(ablation)
# is the time of what was removed. On the session-3 base (128-row tiles) all kept its occupancy
# (registers at Dk = 192 / 128: top_n 128 / 121, back_terms 124 / 113, exp 128 / 123, exp_eq9
# 128 / 124, dot_loop_only 122 / 118).
ABLATIONS = {
    "ablate_top_n": {"_top_n_direct": _no_top_n},
    "ablate_back_terms": {"_shifted_quads": _own_only},
    "ablate_exp": {"_probabilities": _no_exp},
    "ablate_exp_eq9": {"_probabilities": _no_exp, "_importance_by_quarter": _one_sum},
    "dot_loop_only": {
        "_probabilities": _logits_only,
        "_importance_by_quarter": _one_sum,
        "_top_n_direct": _no_top_n,
    },
}


def _libdevice_exp2(x, scale, offset, flush):
    """The exp before session 16: ``jnp.exp2(x * scale - offset)`` on the GPU too."""
    del flush
    return exp2_affine(x, scale, offset, flush=False)


# The default tuning with a change undone (module attribute -> stand-in): the kernel before it.
REVERTS = {"libdevice_exp2": {"exp2_affine": _libdevice_exp2}}

# (T, Dk, name), most informative first.
_64K, _32K, _16K = 65536, 32768, 16384
PLAN = {
    "full": [
        (_64K, 192, "default"),
        (_64K, 192, "first_kernel"),
        (_64K, 128, "default"),
        (_64K, 128, "first_kernel"),
        (_64K, 192, "rows256_warps16"),
        (_64K, 192, "masked_only"),
        (_64K, 192, "rows128_warps8"),
        (_64K, 128, "rows256_warps16"),
        (_64K, 128, "rows128_warps8"),
        *[(_64K, 192, name) for name in ABLATIONS],
        (_16K, 192, "default"),
        (_16K, 192, "first_kernel"),
        (_16K, 192, "rows256_warps16"),
        (_16K, 128, "default"),
        (_16K, 128, "first_kernel"),
        (_16K, 128, "rows256_warps16"),
        (_64K, 192, "rows256_warps16_masked_only"),
        (_64K, 192, "rows64_warps4_masked_only"),
        (_64K, 192, "rows256_state16k"),
        (_64K, 128, "masked_only"),
        (_64K, 128, "ablate_top_n"),
        (_64K, 128, "dot_loop_only"),
        (_64K, 192, "top_n_lanes"),
        (_64K, 192, "quads_argmax"),
        (_64K, 192, "by_token_lanes"),
        (_64K, 192, "by_token_lanes_rows64"),
        (_64K, 128, "by_token_lanes_rows64"),
        (_64K, 192, "keys128"),
        (_64K, 192, "keys32"),
        (_64K, 192, "stages3"),
        (_64K, 128, "rows64_warps4_masked_only"),
        (_64K, 128, "rows256_warps16_masked_only"),
    ],
    # Where the 64-row default's time goes now, and tiles around it.
    "session7": [
        (_64K, 128, "default"),
        *[(_64K, 128, name) for name in ABLATIONS],
        (_64K, 192, "default"),
        *[
            (_64K, dk, name)
            for name in (
                "rows64_keys128",
                "rows64_keys32",
                "rows64_stages3",
                "rows64_warps8",
                "rows32_warps2",
                "rows32_warps4",
            )
            for dk in (128, 192)
        ],
    ],
    # The back_dot variant against the defaults, and the stage it should remove.
    "back_dot": [
        (_64K, 128, "default"),
        (_64K, 128, "back_dot"),
        (_64K, 128, "ablate_back_terms"),
        (_64K, 192, "default"),
        (_64K, 192, "back_dot"),
    ],
    # back_dot at Dk = 192 on the 64-row tiles (where it removed 4 ms at Dk = 128), and at 16K-32K.
    "session8": [
        (_64K, 192, "default"),
        (_64K, 192, "rows64_back_dot"),
        (_64K, 192, "rows64_warps4"),
        (_32K, 192, "default"),
        (_32K, 192, "back_dot"),
        (_16K, 192, "default"),
        (_16K, 192, "back_dot"),
        (_64K, 128, "default"),
        (_64K, 128, "no_back_dot"),
    ],
    # The Dk = 192 default against the 64-row tiles it replaced.
    "dk192": [(_64K, 192, "default"), (_64K, 192, "rows64_warps4"), (_64K, 128, "default")],
    # Session 16: exp2 by fma + ex2.approx.ftz against libdevice's exp2, two rounds, then shorter T.
    "exp2": [
        *[(_64K, dk, name) for _ in range(2) for dk in (128, 192) for name in ("default", "libdevice_exp2")],
        *[(t, dk, name) for t in (_32K, _16K) for dk in (128, 192) for name in ("default", "libdevice_exp2")],
        (_64K, 128, "keys64"),
        (_64K, 192, "rows64_keys128"),
        (_64K, 128, "rows64_stages3"),
        (_64K, 192, "rows64_stages3"),
        (_64K, 192, "rows32_warps2"),
    ],
    # Session 17: one-stage 128-key tiles at Dk = 192, two rounds, and at 32K / 16K.
    "stages1": [
        *[(_64K, 192, name) for _ in range(2) for name in ("default", "keys128_stages1")],
        *[(_64K, 128, name) for name in ("default", "stages1")],
        (_64K, 192, "keys128_stages1_warps8"),
        *[(t, 192, name) for t in (_32K, _16K) for name in ("default", "keys128_stages1")],
    ],
    # Session 24: wider tiles with back_dot (their last timings predate it and the exp2 change), run
    # before the tiled keys. At 64K, Dk = 192: keys128 13.96-14.06 against the default's 13.63-13.90,
    # rows128_warps8 16.94-17.10; Dk = 128: rows128_warps8 11.41-11.49, rows256_warps16 10.47-10.69
    # against 9.28-9.59 (experiments/results/select_blocks_wide_session24_h200.md).
    "wide": [
        *[
            (_64K, 192, name)
            for _ in range(2)
            for name in ("default", "keys128", "rows128_warps8", "keys128_stages1_rows128")
        ],
        *[(_64K, 128, name) for _ in range(2) for name in ("default", "rows128_warps8", "rows256_warps16")],
    ],
    "quick": [
        (_64K, 192, "default"),
        (_64K, 192, "first_kernel"),
        (_64K, 128, "default"),
        (_64K, 128, "first_kernel"),
    ],
}

# Cases of check_compression_gpu.CASES as (index, dtype, ties, variant).
CHECKS = [
    (0, jnp.bfloat16, False, "default"),  # G = 16, odd T = 1999, two key tiles
    (1, jnp.bfloat16, False, "default"),  # paper heads and dims, packed
    (2, jnp.float32, False, "default"),  # G = 4, packed
    (3, jnp.bfloat16, False, "default"),  # G = 1, l=16, d=8, l'=32
    (0, jnp.bfloat16, True, "default"),  # exact ties
    (1, jnp.float32, True, "default"),  # exact ties, packed
    (1, jnp.bfloat16, True, "default"),  # exact ties, packed, the Dk = 192 tiles
    (0, jnp.bfloat16, True, "rows256_warps16"),
    (0, jnp.bfloat16, True, "masked_only"),
    (0, jnp.bfloat16, True, "rows128_warps8"),
    (0, jnp.bfloat16, True, "first_kernel"),
    (0, jnp.bfloat16, True, "back_dot"),
    (1, jnp.bfloat16, False, "back_dot"),
]


@contextlib.contextmanager
def patched(replacements: dict):
    saved = {name: getattr(kernel, name) for name in replacements}
    for name, value in replacements.items():
        setattr(kernel, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernel, name, value)


@functools.cache
def inputs(length: int, dk: int):
    """bf16 q, k_cmp and our compressed forward's lse (B=1, HQ=64, H=4); kept for reuse."""
    keys = jax.random.split(jax.random.key(length + dk), 3)
    slots = length // D
    q = jax.random.normal(keys[0], (1, length, 64, dk), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, slots, 4, dk), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, slots, 4, 128), jnp.bfloat16)
    _, lse = jax.jit(cc.compressed("pallas_triton", dict(block_length=L, block_stride=D), None))(q, k, v)
    return q, k, lse


def compiled_select(name: str, q, k, lse):
    """``(compiled fn(q, k, lse), compile seconds)`` of a variant or ablation."""
    patches = ABLATIONS.get(name, REVERTS.get(name, {}))
    # The ablations replace stages of the kernel without back_dot (session 7's stage split); the
    # reverts undo a change of the default itself.
    tuning = tuned(VARIANTS.get(name, {} if name in REVERTS else {"back_dot": False}), q)
    raw = getattr(kernel.select_blocks, "__wrapped__", kernel.select_blocks)

    def fn(q, k, lse):
        return raw(
            q,
            k,
            lse,
            **GEOMETRY,
            scale=q.shape[-1] ** -0.5,
            tuning=tuning,
            interpret=jax.default_backend() != "gpu",
        )

    start = time.perf_counter()
    with patched(patches):
        compiled = jax.jit(fn).lower(q, k, lse).compile()
    return compiled, time.perf_counter() - start


def near_tie_rows(q, k, lse, ours: np.ndarray, ref: np.ndarray, limit: int = 256) -> tuple[int, int, int]:
    """``(mismatched rows, rows judged, judged rows that are near ties)`` for unpacked B=1 inputs;
    the reference importances of up to ``limit`` mismatched rows are recomputed from their queries."""
    rows = np.argwhere(np.any(ours != ref, axis=-1))
    judged = rows[:limit]
    if not len(judged):
        return len(rows), 0, 0
    positions = np.unique(judged[:, 1])
    index = {t: i for i, t in enumerate(positions)}
    starts = jnp.zeros((1, len(positions)), jnp.int32)
    token_starts = compressed_token_starts(
        jnp.zeros((1, q.shape[1]), jnp.int32), k.shape[1], block_length=L, block_stride=D
    )
    probs = compression_probabilities(
        q[:, positions].astype(jnp.float32),
        lse[:, positions],
        jnp.asarray(positions, jnp.int32)[None],
        starts,
        token_starts,
        k.astype(jnp.float32),
        block_length=L,
        scale=q.shape[-1] ** -0.5,
    )
    score = np.asarray(
        block_importance(
            probs,
            starts,
            num_kv_heads=k.shape[2],
            block_length=L,
            block_stride=D,
            selection_block_size=L_SEL,
            num_blocks=-(-q.shape[1] // L_SEL),
        )
    )
    near = 0
    for b, t, h in judged:
        ours_only = np.setdiff1d(ours[b, t, h], ref[b, t, h])
        ref_only = np.setdiff1d(ref[b, t, h], ours[b, t, h])
        if len(ours_only) and len(ours_only) == len(ref_only) and min(ours_only.min(), ref_only.min()) >= 0:
            values = np.concatenate([score[0, index[t], h, ours_only], score[0, index[t], h, ref_only]])
            near += bool(np.ptp(values) <= cc.NEAR_TIE * np.abs(values).max())
    return len(rows), len(judged), near


def variant_selection(name: str):
    """``check_compression_gpu.selection`` with the kernel of variant ``name`` for ``pallas_triton``."""
    original = cc.selection

    def selection(implementation: str, geometry: dict, segment_ids):
        if implementation != "pallas_triton" or name == "default":
            return original(implementation, geometry, segment_ids)

        def fn(q, k, lse):
            return kernel.select_blocks(
                q,
                k,
                lse,
                **geometry,
                num_initial_blocks=1,
                num_local_blocks=2,
                scale=q.shape[-1] ** -0.5,
                segment_ids=segment_ids,
                tuning=tuned(VARIANTS[name], q),
                interpret=jax.default_backend() != "gpu",
            )

        return fn

    return selection


def run_checks(long_length: int) -> list[dict]:
    results = []
    for index, dtype, ties, name in CHECKS:
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            stack.callback(setattr, cc, "selection", cc.selection)
            cc.selection = variant_selection(name)
            r = cc.run_case(cc.CASES[index], dtype, ties, implementation=None)
        r["variant"] = name
        r["seconds"] = time.perf_counter() - start
        sel = r["select_blocks"]
        print(
            f"{'PASS' if r['ok'] else 'FAIL'} {name} {r['dtype']:8s} {r['case']}{' ties' if ties else ''} "
            f"mismatched rows {sel['mismatched_rows']}/{sel['rows']} (near ties {sel['near_tie_rows']})"
            f" ({r['seconds']:.0f} s)",
            flush=True,
        )
        results.append(r)
    start = time.perf_counter()
    q, k, lse = inputs(long_length, 192)
    ours = np.asarray(jax.jit(cc.selection("pallas_triton", GEOMETRY, None))(q, k, lse))
    ref = np.asarray(jax.jit(cc.selection("xla", GEOMETRY, None))(q, k, lse))
    mismatched, judged, near = near_tie_rows(q, k, lse, ours, ref)
    ok = judged == near and mismatched == judged
    results.append(
        {
            "case": f"T={long_length} Dk=192 G=16 bf16",
            "select_blocks": {
                "rows": int(np.prod(ref.shape[:3])),
                "mismatched_rows": mismatched,
                "judged_rows": judged,
                "near_tie_rows": near,
            },
            "ok": ok,
            "seconds": time.perf_counter() - start,
        }
    )
    print(
        f"{'PASS' if ok else 'FAIL'} T={long_length} Dk=192: mismatched rows {mismatched}/{ref.size // N}, "
        f"{near} of {judged} judged are near ties ({results[-1]['seconds']:.0f} s)",
        flush=True,
    )
    return results


def markdown(report: dict) -> str:
    lines = [f"Device {report['device']}, jax {report['jax']}."]
    if report["checks"]:
        passed = sum(r["ok"] for r in report["checks"])
        lines.append(f"select_blocks checks: {passed}/{len(report['checks'])} passed.")
    lines += [
        "",
        "| T | Dk | variant | ms | vs first_kernel | QK TFLOP/s | mismatched rows vs default | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = {(r["T"], r["dk"]): r["ms"] for r in report["timings"] if r["name"] == "first_kernel"}
    for r in report["timings"]:
        if r.get("ms") is None:
            lines.append(f"| {r['T']} | {r['dk']} | {r['name']} | {r.get('error', 'skipped')} | | | | |")
            continue
        base = first.get((r["T"], r["dk"]))
        speedup = f"{base / r['ms']:.2f}x" if base else "-"
        mismatch = "-" if r.get("mismatched_rows") is None else str(r["mismatched_rows"])
        lines.append(
            f"| {r['T']} | {r['dk']} | {r['name']} | {r['ms']:.2f} | {speedup} | {r['qk_tflops']:.0f}"
            f" | {mismatch} | {r['compile_s']:.1f} |"
        )
    timed = [r for r in report["timings"] if r.get("ms")]
    defaults = {(r["T"], r["dk"]): r["ms"] for r in timed if r["name"] == "default"}
    for (length, dk), base in sorted(defaults.items()):
        ms = {r["name"]: r["ms"] for r in timed if (r["T"], r["dk"]) == (length, dk)}
        parts = []
        if "ablate_top_n" in ms:
            parts.append(f"top-n {base - ms['ablate_top_n']:.2f}")
        if "ablate_back_terms" in ms:
            parts.append(f"back terms (their sums and shift) {base - ms['ablate_back_terms']:.2f}")
        if "ablate_exp" in ms:
            parts.append(f"exp {base - ms['ablate_exp']:.2f}")
            if "ablate_exp_eq9" in ms:
                parts.append(f"Eq. 9 and group sums {ms['ablate_exp'] - ms['ablate_exp_eq9']:.2f}")
        if "dot_loop_only" in ms:
            parts.append(f"dots, loads, loop and state writes alone {ms['dot_loop_only']:.2f}")
        if parts:
            head = f"T={length} Dk={dk}, default {base:.2f} ms; ms of each stage (default minus ablation): "
            lines += ["", head + ", ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the timing part")
    parser.add_argument("--plan", choices=list(PLAN), default="full")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU smoke test: T / 64 everywhere, Pallas interpret mode"
    )
    args = parser.parse_args()
    shrink = 64 if args.smoke else 1
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "select_blocks_bench")
    report = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "command": "PYTHONPATH=$PWD python3 " + " ".join(sys.argv),
        "variants": VARIANTS,
        "ablations": {name: sorted(patches) for name, patches in ABLATIONS.items()},
        "reverts": {name: sorted(patches) for name, patches in REVERTS.items()},
        "checks": [],
        "timings": [],
    }

    def write() -> None:
        with open(path + ".json", "w") as f:
            json.dump(report, f, indent=1, default=str)

    checks_ok = True
    if not args.skip_checks:
        try:
            report["checks"] = run_checks(65536 // shrink)
        except Exception as err:  # a crash is a result: record it and time what compiles
            report["checks"] = [{"case": "crashed", "ok": False, "error": f"{type(err).__name__}: {err}"}]
            print(f"FAIL checks crashed: {type(err).__name__}: {str(err)[:500]}", flush=True)
        checks_ok = all(r["ok"] for r in report["checks"])
        write()

    start = time.perf_counter()
    defaults = {}
    for full_length, dk, name in PLAN[args.plan]:
        length = full_length // shrink
        row = {"T": length, "dk": dk, "name": name}
        report["timings"].append(row)
        if time.perf_counter() - start > args.budget:
            row["error"] = "skipped (budget)"
            continue
        try:
            q, k, lse = inputs(length, dk)
            compiled, row["compile_s"] = compiled_select(name, q, k, lse)
            row["ms"] = time_jax(compiled, q, k, lse, iters=args.iters)
        except Exception as err:  # a variant that fails to compile is a result
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(json.dumps(row), flush=True)
            write()
            continue
        row["qk_tflops"] = 2.0 * 64 * cc.compressed_pairs(length) * dk / row["ms"] / 1e9
        if name in VARIANTS or name in REVERTS:
            picks = np.asarray(compiled(q, k, lse))
            if name == "default":
                defaults[(length, dk)] = picks
            if (length, dk) in defaults:
                row["mismatched_rows"] = int(np.sum(np.any(picks != defaults[(length, dk)], axis=-1)))
        print(json.dumps(row), flush=True)
        write()
    md = markdown(report)
    with open(path + ".md", "w") as f:
        f.write(md)
    write()
    print(md)
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
