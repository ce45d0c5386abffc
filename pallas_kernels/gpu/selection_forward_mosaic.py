"""The selected-attention forward keys to queries, in Pallas Mosaic GPU (Hopper: TMA and wgmma).

Same result as the Triton forward of :mod:`pallas_kernels.gpu.selection` (spec, "Selected
attention (Eq. 12)"), computed the other way round. The Triton forward runs one program per
query position and reads each of its ``n`` selected key blocks (``64 * (Dk + Dv)`` values)
through L2 for the ``G = 16`` query rows alone: at T = 64K, Dk = 192 that is about 137 GB and
bounds it at about 15 ms (experiments/results/session22_h200.md). Here one program per key tile
(and KV head and split) reads the tile's keys and values once and walks the (query, slot) pairs
that selected it, in the inverse map's list order (:mod:`pallas_kernels.gpu.inverse_map`),
``PAIRS = 4`` pairs (64 rows) a step, as the backward's tile kernel
(:mod:`pallas_kernels.gpu.selection_mosaic`) does:

- the memory warpgroup gathers each step's query rows (``G`` rows of ``q`` a pair, by TMA) and
  its entry ids into a ring of ``stages`` shared-memory slots;
- two compute warpgroups take alternate steps (so ``stages`` is even and each slot has one
  user): ``S = Q K^T`` with the causal mask of the pair's query, the block's own softmax, and
  ``O = P V`` with ``P`` from registers; they store each step's normalised partial output
  (``[64, Dv]`` in the input dtype) and its base-2 log-sum-exp (``[64]`` float32) by TMA.

The partials go to rows in *padded list order*: every tile's list is padded to whole steps
(:func:`padded_offsets`), so a step's 64 rows are one aligned copy that no other program's rows
share. :func:`merge_partials` (XLA) then combines each query's ``n`` partials by their
log-sum-exps into the output and the log-sum-exp the backward reads. With
``SelectionTuning.forced_merge`` the programs start past each list's forced pairs (``firsts``) and
:mod:`pallas_kernels.gpu.forced_merge` attends those blocks, writing their partial into one of the
query's rows (no faster on the H200, session 27).

On the H200 at T = 64K (random causal blocks, block 0 always picked; experiments/results/
session25_h200.md): forward 15.5 against 18.8 ms at Dk = 192 / Dv = 128 (kernel 10.5, merge 5.0,
inverse map 0.4) and 13.7 against 15.3 at D = 128. Under ncu the kernel is DRAM-bound (77% of
DRAM throughput, 48% L2 hits): it writes 17 GB of bf16 partials and gathers 26 GB of query rows.
Measured and dropped there: the merge as a Pallas kernel (no faster), programs by range of queries
launched range-major so that query rows stay in L2 (slower), 6 or 8 slots (within 1% of 4).

Served: what the backward's tile kernel serves (:func:`pallas_kernels.gpu.selection_mosaic.supports`).
In interpret mode (CPU) one warpgroup issues each step's copies itself and then computes it,
as in the backward's kernel (see its module notes).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.selection_mosaic import (
    _ALIGNED_INTS,
    _HEADS,
    _ID_WINDOW,
    _KEYS,
    _ROWS,
    _SHARED_BYTES,
    PAIRS,
    ProgramList,
    Programs,
    gather_ring,
    whole_tiles,
)

_COMPUTE = 2  # compute warpgroups; warpgroup 2 gathers
_MEMORY = _COMPUTE
# Logit given to masked keys: finite, so that a dead row (a step's padding) never makes NaNs.
_MASKED = -1e30


def shared_bytes(dk: int, dv: int, stages: int) -> int:
    """Shared memory of a program: the key/value tile, ``stages`` query slots with their ids, and
    each compute warpgroup's output rows and log-sum-exps."""
    two = 2
    tile = _KEYS * (dk + dv) * two
    slot = _ROWS * dk * two + _ALIGNED_INTS * 4
    return tile + stages * slot + _COMPUTE * (_ROWS * dv * two + _ROWS * 4)


def stages_for(dk: int, dv: int, wanted: int) -> int:
    """The deepest even ring of query slots, at most ``wanted`` (at least 2), that fits."""
    stages = max(2, wanted - wanted % 2)
    while stages > 2 and shared_bytes(dk, dv, stages) > _SHARED_BYTES:
        stages -= 2
    return stages


def padded_offsets(offsets: jax.Array) -> jax.Array:
    """int32 ``[B, H, num_tiles + 1]``: the inverse map's list offsets with every tile's list
    rounded up to whole steps of ``PAIRS`` pairs."""
    counts = offsets[..., 1:] - offsets[..., :-1]
    steps = jax.lax.div(counts + PAIRS - 1, PAIRS) * PAIRS
    return jnp.concatenate([jnp.zeros_like(offsets[..., :1]), jnp.cumsum(steps, axis=-1)], axis=-1)


def _per_pair(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table [B, H, S]`` at ``index [B, T, H, n]`` (per batch row and KV head)."""
    batch_index = jnp.arange(index.shape[0])[:, None, None, None]
    head_index = jnp.arange(index.shape[2])[None, None, :, None]
    return table[batch_index, head_index, index]


def tile_forward(
    q5: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_starts: jax.Array,
    entries: jax.Array,
    offsets: jax.Array,
    order: jax.Array,
    positions: jax.Array,
    *,
    slots: int,
    scale: float,
    programs: Programs,
    stages: int,
    interpret: bool,
    firsts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each listed (query, slot) pair's normalised partial output and log-sum-exp.

    Args:
      q5: ``[B, T, H, 16, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
      key_starts: ``[B, T, H, n]``, each pair's first key (``-1``: none).
      entries, offsets, order, slots, programs: as for
        :func:`pallas_kernels.gpu.selection_mosaic.tile_backward`.
      positions: ``[B, T, H, n]``, each pair's list position
        (:func:`pallas_kernels.gpu.selection_mosaic.list_positions`, ``-1``: unlisted).
      scale: logit scale; stages: query slots in the ring (even).
      interpret: run in Mosaic GPU interpret mode (CPU), one warpgroup.
      firsts: int32 ``[B, H, num_tiles]``, where each tile's pairs start (whole steps into its
        list, :func:`pallas_kernels.gpu.forced_merge.list_firsts`); ``None``: at its start.

    Returns:
      ``(out_rows [B, H, R' * 16, Dv]`` in ``q5.dtype``, ``lse_rows [B, H, R' * 16]`` float32, base
      2 of the scaled logits, ``rows [B, T, H, n]``): rows ``16 i .. 16 i + 15`` hold the pair at
      ``rows == i`` (``-1``: unlisted). Each tile's pairs are padded to whole steps, so rows of
      padding hold values of no pair.
    """
    batch, _, heads, _, dk = q5.shape
    dv = v.shape[-1]
    if stages % 2:
        raise ValueError(f"stages must be even (each compute warpgroup owns alternate slots), got {stages}")
    num_tiles = offsets.shape[-1] - 1
    programs = programs.for_tiles(num_tiles)
    k, v = whole_tiles(k, num_tiles), whole_tiles(v, num_tiles)
    padded = padded_offsets(offsets)
    pair_rows = positions + _per_pair(padded - offsets, jnp.maximum(key_starts, 0) // _KEYS)
    pair_rows = jnp.where(positions >= 0, pair_rows, -1)
    if firsts is None:
        firsts = offsets[..., :-1]
    grid, names = programs.grid(batch, heads, num_tiles)
    # The last step's id window reads past its first entry: keep it in bounds.
    entries = jnp.pad(entries, ((0, 0), (0, 0), (0, _ID_WINDOW)))
    dtype = q5.dtype
    log2_scale = scale * math.log2(math.e)
    inline = interpret
    workers = 1 if inline else _COMPUTE

    def kernel(
        entries_ref, offsets_ref, firsts_ref, padded_ref, order_ref, q_ref, k_ref, v_ref,
        out_ref, lse_ref,
        k_smem, v_smem, q_smem, ids_smem, o_smem, lse_smem, p_smem, kv_barrier, loaded, consumed,
    ):  # fmt: skip
        wg = jax.lax.axis_index("wg")
        head = jax.lax.axis_index("head")
        b = jax.lax.axis_index("batch")
        program = ProgramList.split_tile(b, head, entries_ref, offsets_ref, order_ref, programs, firsts_ref)
        first, steps, tile = program.first, program.steps, program.tile
        # Shares are whole steps from the list's start, so every step's rows start a whole step in.
        padded_first = padded_ref[b, head, tile] + first - offsets_ref[b, head, tile]

        def issue_copies(step, queries):
            """Step ``step``'s ids and query rows into its slot, completing on ``loaded``."""
            slot = jax.lax.rem(step, stages)
            program.copy_ids(first + step * PAIRS, ids_smem.at[slot], loaded.at[slot])
            for j, t in enumerate(queries):
                rows = q_smem.at[slot, pl.ds(j * _HEADS, _HEADS)]
                plgpu.copy_gmem_to_smem(q_ref.at[b, t, head], rows, loaded.at[slot])

        queries_of = functools.partial(program.queries_of, slots=slots)
        if not inline:
            pl.when(wg == _MEMORY)(lambda: gather_ring(steps, stages, consumed, queries_of, issue_copies))

        def compute(worker):
            """Steps ``worker, worker + workers, ..`` of the program."""
            o_out, lse_out = o_smem.at[worker], lse_smem.at[worker]
            iota = functools.partial(
                plgpu.broadcasted_iota, jnp.int32, (_ROWS, _KEYS), layout=plgpu.Layout.WGMMA
            )
            row, key_position = iota(0), program.tile * _KEYS + iota(1)

            def step_body(i, carry):
                step = i * workers + worker
                slot = jax.lax.rem(step, stages)
                if inline:
                    issue_copies(step, queries_of(step))
                plgpu.barrier_wait(loaded.at[slot])
                start = first + step * PAIRS
                visible = key_position <= program.query_by_row(ids_smem.at[slot], start, slots, row)

                def scores(acc):
                    plgpu.wgmma(acc, q_smem.at[slot], k_smem.T)
                    return acc[...]

                s = pl.run_scoped(scores, plgpu.ACC((_ROWS, _KEYS), jnp.float32))
                if not inline:
                    plgpu.barrier_arrive(consumed.at[slot])
                logits = jnp.where(visible, s * log2_scale, _MASKED)
                top = logits.max(axis=1)
                p = jnp.exp2(logits - jax.lax.broadcast_in_dim(top, (_ROWS, _KEYS), [0]))
                total = p.sum(axis=1)
                p16 = p.astype(dtype)
                if inline:
                    # The interpreter's MMAs take shared-memory operands only.
                    p_smem[...] = p16
                    plgpu.commit_smem()
                    p16 = p_smem

                def values(acc):
                    plgpu.wgmma(acc, p16, v_smem)
                    return acc[...]

                o = pl.run_scoped(values, plgpu.ACC((_ROWS, dv), jnp.float32))
                o = o / jax.lax.broadcast_in_dim(total, (_ROWS, dv), [0])
                # The previous step's stores must have read the buffers before they are overwritten.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_out[...] = o.astype(dtype)
                lse_out[...] = top + jnp.log2(total)
                plgpu.commit_smem()
                rows = pl.ds((padded_first + step * PAIRS) * _HEADS, _ROWS)
                plgpu.copy_smem_to_gmem(o_out, out_ref.at[b, head, rows], commit_group=False)
                plgpu.copy_smem_to_gmem(lse_out, lse_ref.at[b, head, rows], commit_group=False)
                plgpu.commit_smem_to_gmem_group()
                return carry

            jax.lax.fori_loop(0, jax.lax.div(steps - worker + workers - 1, workers), step_body, None)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg < workers)
        def _compute():
            if not inline:
                plgpu.set_max_registers(232, action="increase")

            @pl.when(wg == 0)
            def _():
                keys = pl.ds(program.tile * _KEYS, _KEYS)
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, head], k_smem, kv_barrier)
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, head], v_smem, kv_barrier)

            plgpu.barrier_wait(kv_barrier)
            if inline:
                compute(0)
            else:
                for worker in range(_COMPUTE):
                    pl.when(wg == worker)(functools.partial(compute, worker))

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    transforms = (tiling, swizzle)
    scratch = [
        plgpu.SMEM((_KEYS, dk), dtype, transforms=transforms),
        plgpu.SMEM((_KEYS, dv), dtype, transforms=transforms),
        plgpu.SMEM((stages, _ROWS, dk), dtype, transforms=transforms),
        plgpu.SMEM((stages, _ALIGNED_INTS), jnp.int32),
        plgpu.SMEM((workers, _ROWS, dv), dtype, transforms=transforms),
        plgpu.SMEM((workers, _ROWS), jnp.float32),
        # P as an MMA operand in shared memory, for the interpreter only (one row: unused on the GPU).
        plgpu.SMEM((_ROWS, _KEYS) if inline else (8, _KEYS), dtype, transforms=transforms),
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=1 + PAIRS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    ]
    num_rows = (entries.shape[-1] - _ID_WINDOW + (PAIRS - 1) * num_tiles) * _HEADS
    out_type = [
        jax.ShapeDtypeStruct((batch, heads, num_rows, dv), dtype),
        jax.ShapeDtypeStruct((batch, heads, num_rows), jnp.float32),
    ]
    out_rows, lse_rows = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=names,
        num_threads=1 if inline else _COMPUTE + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="nsa_selected_fwd_mosaic",
    )(entries, offsets, firsts, padded, order, q5, k, v)
    return out_rows, lse_rows, pair_rows


def merge_partials(
    out_rows: jax.Array, lse_rows: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Each query's partials combined (XLA): ``(out [B, T, H, 16, Dv]`` in ``out_rows.dtype``,
    ``lse [B, T, H, 16]`` float32, base 2).

    Args:
      out_rows, lse_rows: :func:`tile_forward`'s outputs.
      positions: ``[B, T, H, n]`` from :func:`padded_positions` (``-1``: unlisted).

    A query with no listed pair gets output 0 and log-sum-exp 0, as the Triton forward.
    """
    batch, heads, num_rows, dv = out_rows.shape
    length, slots = positions.shape[1], positions.shape[3]
    by_head = jnp.transpose(positions, (0, 2, 1, 3)).reshape(batch, heads, length * slots)
    gather = jax.vmap(jax.vmap(lambda table, at: table[at]))
    at = jnp.maximum(by_head, 0)
    out = gather(out_rows.reshape(batch, heads, num_rows // _HEADS, _HEADS, dv), at)
    lse = gather(lse_rows.reshape(batch, heads, num_rows // _HEADS, _HEADS), at)
    out = out.reshape(batch, heads, length, slots, _HEADS, dv)
    listed = (by_head >= 0).reshape(batch, heads, length, slots, 1)
    lse = jnp.where(listed, lse.reshape(batch, heads, length, slots, _HEADS), -jnp.inf)
    top = jnp.max(lse, axis=3)
    seen = top > -jnp.inf
    weights = jnp.exp2(lse - jnp.where(seen, top, 0.0)[:, :, :, None])
    total = jnp.sum(weights, axis=3)
    merged = jnp.sum(weights[..., None] * out.astype(jnp.float32), axis=3)
    merged = merged / jnp.where(seen, total, 1.0)[..., None]
    merged_lse = jnp.where(seen, top + jnp.log2(jnp.where(seen, total, 1.0)), 0.0)
    return (
        jnp.transpose(merged, (0, 2, 1, 3, 4)).astype(out_rows.dtype),
        jnp.transpose(merged_lse, (0, 2, 1, 3)),
    )
