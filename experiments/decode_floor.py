"""What a decode step made of streaming kernels costs on this GPU, in bench_decode.py's harness.

    PYTHONPATH=$PWD python3 experiments/decode_floor.py --dk 128 --profile --out $OUT   # GPU, ~30 s

The NSA decode step at B=16, S=64K (paper geometry, HQ=64, H=4) reads the compressed cache in
kernel 1 (134 MB at Dk=Dv=128, 168 MB at Dk=192/Dv=128), scores and picks blocks in kernel 2,
and reads the selected and window blocks in kernel 3 (50 / 63 MB;
experiments/results/decode_h200.md). This script times kernels that only read those bytes:
each program runs a dot over ``[64, 256]`` bf16 tiles of its own contiguous rows (a dot, so
that Triton stages the tiles through shared memory as in the NSA kernels; contiguous rows, the
best case for the memory system) and writes a partial. Every step runs in the jitted loop of
``bench_decode.looped`` (96 steps chained through the query), as the NSA step and dense
decode do in bench_decode.py. Steps:

- ``harness``: one launch that reads nothing and writes the three ``[B, HQ, Dv]`` outputs;
- ``kernel1_bytes`` / ``kernel3_bytes`` / ``both_one_launch`` / ``dense_bytes``: one launch
  that reads kernel 1's bytes, kernel 3's, both, or dense decode's (2.1 GB);
- ``two_launches``: kernel 1's bytes, then kernel 3's in a launch that reads the first one's
  partials;
- ``three_launches``: the same with a launch between them that reads the partials and writes one
  value per (sequence, KV head): a kernel 2 that does no work;

and, in the same process, the NSA step (``decode_attention`` defaults) and dense cuDNN decode
(D=128, as bench_decode.py). ``three_launches`` is the floor of a step of the shipped design;
``both_one_launch`` that of a one-launch step that reads what the NSA step reads and selects
nothing. Input sets rotate as in bench_decode so that no step reads from L2 what the last one
left there. ``--profile`` adds each step's kernels (count, median us) from a ``jax.profiler``
trace, for a kernel-by-kernel comparison with the NSA step's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from experiments.bench_decode import HEADS, KV_HEADS, nsa_step, random_cache, sets_for, time_loop
from experiments.bench_decode import looped as bench_looped
from experiments.measure import gpu_events
from experiments.profile_decode import summary as profile_summary

BATCH, LENGTH, DIM = 16, 65536, 128
TILE, WIDTH = 64, 256  # a tile: 64 tokens of one head's key and value (128 + 128 bf16)
TILE_BYTES = TILE * WIDTH * 2
# Off the GPU the kernels run in Pallas interpret mode (a smoke test of their shapes; main() times
# nothing there).
INTERPRET = jax.default_backend() != "gpu"
# Dense decode's bytes (B=16, S=64K, H=4, D=128: 2.1 GB) as (programs, tiles a program).
DENSE_READ = (264, 248)


def read_plan(dk: int) -> dict[str, tuple[int, int]]:
    """``(programs, tiles a program)`` of each one-launch read at ``Dk`` (Dv = 128): kernel 1's
    bytes as its 256 programs of 1024 compressed tokens, kernel 3's (1536 tokens of 64 rows)
    over about 256 programs, both in one launch, and dense decode's."""
    if dk not in (128, 192):
        raise ValueError(f"dk must be 128 or 192 (the paper's head dims), got {dk}")
    if dk == 128:
        return {"kernel1_bytes": (256, 16), "kernel3_bytes": (256, 6), "both_one_launch": (256, 22)}
    return {"kernel1_bytes": (256, 20), "kernel3_bytes": (240, 8), "both_one_launch": (264, 27)}


def _stream_kernel(dep_ref, x_ref, partial_ref, *out_refs, tiles: int):
    """One program: sums its ``tiles`` tiles of ``x_ref [tiles * 64, 256]``; ``dep_ref`` holds
    what the launch depends on (the query, or the last launch's partials). Programs ``< B``
    also write row ``p`` of each output, so that the step returns what the NSA step returns."""
    program = pl.program_id(0)
    dep = jnp.sum(dep_ref[...].astype(jnp.float32))

    # A dot per tile, as in the NSA kernels: Triton stages the tiles of a dot operand through shared
    # memory ahead of use (num_stages), which it does not do for a plain reduction's loads.
    ones = jnp.ones((16, TILE), x_ref.dtype)

    def body(i, acc):
        return acc + jnp.dot(ones, x_ref[pl.ds(i * TILE, TILE), :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, tiles, body, jnp.zeros((16, WIDTH), jnp.float32))
    acc = jnp.sum(acc, axis=0) / 16 + dep
    partial_ref[...] = acc

    @pl.when(program < BATCH)
    def _outputs():
        for out_ref in out_refs:
            out_ref[...] = jnp.full(out_ref.shape, jnp.sum(acc), out_ref.dtype)


def stream(
    dep: jax.Array, x: jax.Array, *, outputs: int, tiles: int | None = None, name: str = "floor_stream"
) -> tuple[jax.Array, ...]:
    """``x [P, tiles * 64, 256]`` bf16 read by P programs (``tiles=0``: none read); returns the
    ``[P, 256]`` partials and ``outputs`` arrays ``[B, HQ, Dv]`` bf16. The launch reads the first
    1024 elements of ``dep`` (a bitcast to 1-D: no copy in front of it)."""
    if x.ndim != 3 or x.shape[2] != WIDTH or x.shape[1] % TILE:
        raise ValueError(f"x must be [P, tiles * {TILE}, {WIDTH}], got {x.shape}")
    programs, rows, _ = x.shape
    if tiles is not None and not 0 <= tiles <= rows // TILE:
        raise ValueError(f"tiles must be in [0, {rows // TILE}] for x of {rows} rows, got {tiles}")
    flat = dep.reshape(-1)
    dep_block = min(flat.shape[0], 1024)
    return pl.pallas_call(
        functools.partial(_stream_kernel, tiles=rows // TILE if tiles is None else tiles),
        grid=(programs,),
        in_specs=[
            pl.BlockSpec((dep_block,), lambda p: (0,)),
            pl.BlockSpec((None, rows, WIDTH), lambda p: (p, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, WIDTH), lambda p: (p, 0)),
            *[pl.BlockSpec((None, HEADS, DIM), lambda p: (jnp.minimum(p, BATCH - 1), 0, 0))] * outputs,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((programs, WIDTH), jnp.float32),
            *[jax.ShapeDtypeStruct((BATCH, HEADS, DIM), jnp.bfloat16)] * outputs,
        ],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
        interpret=INTERPRET,
        name=name,
    )(flat, x)


def _pick_kernel(partial_ref, out_ref):
    """One (sequence, KV head): reads every partial and writes one value."""
    out_ref[...] = jnp.full((16,), jnp.sum(partial_ref[...]), jnp.float32)


def pick(partials: jax.Array) -> jax.Array:
    """A kernel-2 stand-in: ``B * H`` programs, one round trip each, over ``partials [P, 256]``
    (:func:`stream`'s); ``[B * H, 16]``."""
    if partials.ndim != 2 or partials.shape[1] != WIDTH:
        raise ValueError(f"partials must be [P, {WIDTH}] as stream writes them, got {partials.shape}")
    rows = BATCH * KV_HEADS
    return pl.pallas_call(
        _pick_kernel,
        grid=(rows,),
        in_specs=[pl.BlockSpec(partials.shape, lambda r: (0, 0))],
        out_specs=pl.BlockSpec((None, 16), lambda r: (r, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, 16), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=INTERPRET,
        name="floor_pick",
    )(partials)


def _stream_data(key, programs: int, tiles: int) -> jax.Array:
    return jax.random.normal(key, (programs, tiles * TILE, WIDTH), jnp.bfloat16)


def _read_bytes(programs: int, tiles: int) -> int:
    return programs * tiles * TILE_BYTES


def steps(dk: int) -> dict:
    """``name -> (step(q, *inputs) -> outputs, inputs of one set as a function of a key, bytes)``."""
    plan = {**read_plan(dk), "dense_bytes": DENSE_READ}

    def single(name):
        programs, tiles = plan[name]
        return (
            lambda q, x: stream(q, x, outputs=3, name=f"floor_{name}")[1:],
            lambda key: (_stream_data(key, programs, tiles),),
            _read_bytes(programs, tiles),
        )

    def chain(with_pick: bool):
        first, second = plan["kernel1_bytes"], plan["kernel3_bytes"]

        def step(q, x1, x2):
            partials = stream(q, x1, outputs=0, name="floor_kernel1_bytes")[0]
            dep = pick(partials) if with_pick else partials
            return stream(dep, x2, outputs=3, name="floor_kernel3_bytes")[1:]

        def make(key):
            key1, key2 = jax.random.split(key)
            return _stream_data(key1, *first), _stream_data(key2, *second)

        return step, make, _read_bytes(*first) + _read_bytes(*second)

    table = {name: single(name) for name in plan}
    table["harness"] = (
        lambda q, x: stream(q, x, outputs=3, tiles=0, name="floor_harness")[1:],
        lambda key: (jnp.zeros((264, TILE, WIDTH), jnp.bfloat16),),
        0,
    )
    table["two_launches"] = chain(False)
    table["three_launches"] = chain(True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=pathlib.Path, help="folder for decode_floor_dk<Dk>[_<tag>].json")
    parser.add_argument(
        "--dk", type=int, default=128, help="the NSA step's key head dim (128 or 192; Dv = 128)"
    )
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2, help="every step timed this many times, interleaved")
    parser.add_argument("--tag", default="", help="a name for this run's settings (XLA_FLAGS, say)")
    parser.add_argument(
        "--profile", action="store_true", help="also list every step's kernels from a jax.profiler trace"
    )
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("decode_floor.py times GPU kernels; run it on the GPU")
    start = time.perf_counter()
    key = jax.random.key(0)
    q = jax.random.normal(key, (BATCH, HEADS, DIM), jnp.bfloat16)
    timed = {}
    for name, (step, make, nbytes) in steps(args.dk).items():
        num_sets = sets_for(nbytes) if nbytes else 1
        sets = tuple(make(jax.random.fold_in(key, i)) for i in range(num_sets))
        fn, ran = bench_looped(step, num_sets, args.steps)
        timed[name] = (fn, (q, sets), ran, nbytes)
    caches = tuple(
        (random_cache(jax.random.fold_in(key, 100 + i), batch=BATCH, length=LENGTH, dk=args.dk, dv=DIM),)
        for i in range(2)
    )
    q_nsa = jax.random.normal(jax.random.fold_in(key, 7), (BATCH, HEADS, args.dk), jnp.bfloat16)
    fn, ran = bench_looped(nsa_step("new"), len(caches), args.steps)
    timed["nsa"] = (fn, (q_nsa, caches), ran, None)
    dense_sets = (
        (
            jax.random.normal(key, (BATCH, LENGTH, KV_HEADS, DIM), jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(key, 1), (BATCH, LENGTH, KV_HEADS, DIM), jnp.bfloat16),
        ),
    )
    dense = lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),)
    fn, ran = bench_looped(dense, 1, args.steps)
    timed["dense_cudnn"] = (fn, (q[:, None], dense_sets), ran, None)

    rounds = {name: [] for name in timed}
    for _ in range(args.rounds):
        for name, (fn, fn_args, ran, _) in timed.items():
            rounds[name].append(time_loop(fn, fn_args, ran, args.repeats) * 1e3)
    report = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "tag": args.tag,
        "dk": args.dk,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "command": "PYTHONPATH=$PWD python3 experiments/decode_floor.py " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "repeats": args.repeats,
        "us_per_step": rounds,
        "bytes": {name: entry[3] for name, entry in timed.items() if entry[3] is not None},
        "wall_s": time.perf_counter() - start,
    }
    if args.profile:
        report["profile"] = {}
        for name, (fn, fn_args, _, _) in timed.items():
            report["profile"][name] = profile_summary(gpu_events(fn, fn_args))
    for name, values in rounds.items():
        nbytes = report["bytes"].get(name)
        rate = f", {nbytes / min(values) / 1e6:.2f} TB/s" if nbytes else ""
        print(f"Dk={args.dk} {args.tag} {name}: " + " / ".join(f"{v:.1f}" for v in values) + f" us{rate}")
        for kernel, (count, median) in report.get("profile", {}).get(name, {}).get("kernels", {}).items():
            print(f"    {count:4d} x {median:8.2f} us  {kernel[:80]}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = f"_{args.tag}" if args.tag else ""
        (args.out / f"decode_floor_dk{args.dk}{suffix}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
