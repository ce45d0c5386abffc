"""One decode step of NSA attention as one persistent Pallas kernel (Triton lowering).

Spec, "Decoding": the step's three kernels (:mod:`pallas_kernels.gpu.decode_step`'s
compressed pass and selection, :mod:`pallas_kernels.gpu.decode`'s selected and window
reads) run as tasks of one launch, so that one (sequence, KV head)'s selection overlaps
the others' reads instead of leaving HBM idle between launches. The kernel bodies are
theirs, unchanged: each task runs one body on :class:`~pallas_kernels.gpu.views.RefWindow`
views of the whole arrays, which look like the blocks the three kernels' ``BlockSpec``\\ s
cut.

Tasks, per (sequence, KV head) ``row``:

- ``COMPRESS``: one chunk of the compressed tokens (kernel 1's program);
- ``SELECT``: one part of the selection blocks (kernel 2's program); it waits until every
  chunk of its row is done, and the part that draws the row's last ticket writes the picks;
- ``READ``: one group of selected or window blocks (kernel 3's program); a selected group
  waits for its row's picks; the last group of a row merges and writes both branches.

A program takes the next task from a queue counter until the table is done. The table
(:func:`task_table`) puts every task after the tasks it waits on, so a program only ever
waits on tasks that programs running now took before it: the kernel cannot deadlock,
whatever the number of programs resident, and Pallas interpret mode, which runs the
programs one after another, runs the tasks in table order with every wait already met.
A row's tasks are spread through the table (``selection_lag``, ``reads_lag`` rows
apart), so that its selection runs while later rows' compressed chunks stream, and the
window reads, which wait on nothing, come last, to fill the time the last rows' selection
takes.

Ordering: a finished task's stores are published by a block barrier and an
acquire-release atomic on a per-row counter; a waiting program polls the counter with
atomics. Every per-row buffer another program reads holds whole 128-byte lines a row,
so no cached line can mix a published row with an unpublished one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gpu import decode, decode_step
from pallas_kernels.gpu.tiles import padded, require_supported_dtype
from pallas_kernels.gpu.views import RefWindow, atomic_add_first

COMPRESS, SELECT, READ = 0, 1, 2
_VOLATILE_POLL = False
# Columns of the per-row counters: chunks done, selection tickets, picks written, read tickets.
_CHUNKS_DONE, _SELECT_TICKETS, _PICKS_WRITTEN, _READ_TICKETS = range(4)


@dataclasses.dataclass(frozen=True)
class FusedLaunch:
    """Launch of the fused step.

    Attributes:
      programs: programs launched (each runs tasks until the table is done); two an SM
        on the 132 SMs of an H100/H200.
      num_warps, num_stages: of every task (the kernel is one Triton function).
      tile: compressed tokens per inner step of a ``COMPRESS`` task.
      chunks: ``COMPRESS`` tasks a row, at most (a power of two, no chunk empty).
      parts: ``SELECT`` tasks a row, at most (see :mod:`pallas_kernels.gpu.decode_step`).
      read_items: selected or window blocks per ``READ`` task.
      selection_lag: rows between a row's ``COMPRESS`` tasks and its ``SELECT`` tasks in the table.
      reads_lag: rows between a row's ``SELECT`` tasks and its selected ``READ`` tasks.
    """

    programs: int = 264
    num_warps: int = 4
    num_stages: int = 3
    tile: int = 64
    chunks: int = 8
    parts: int = 4
    read_items: int = 4
    selection_lag: int = 16
    reads_lag: int = 4
    prefetch: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            minimum = 0 if field.name.endswith("_lag") or field.name == "prefetch" else 1
            if getattr(self, field.name) < minimum:
                raise ValueError(
                    f"FusedLaunch.{field.name} must be >= {minimum}, got {getattr(self, field.name)}"
                )


def task_table(
    rows: int,
    chunks: int,
    parts: int,
    selected_reads: int,
    window_reads: int,
    selection_lag: int,
    reads_lag: int,
) -> np.ndarray:
    """int32 ``[tasks, 3]`` of ``(kind, row, index)``: every task after those it waits on."""
    tasks = []
    for step in range(rows + selection_lag + reads_lag):
        if step < rows:
            tasks += [(COMPRESS, step, chunk) for chunk in range(chunks)]
        row = step - selection_lag
        if 0 <= row < rows:
            tasks += [(SELECT, row, part) for part in range(parts)]
        row -= reads_lag
        if 0 <= row < rows:
            tasks += [(READ, row, group) for group in range(selected_reads)]
    for row in range(rows):
        tasks += [(READ, row, selected_reads + group) for group in range(window_reads)]
    return np.asarray(tasks, np.int32)


def _publish(counter: RefWindow, interpret: bool) -> None:
    if not interpret:
        # Every thread's stores before the count (released by one thread).
        plt.debug_barrier()
    atomic_add_first(counter, 1)


def _wait(counter: RefWindow, target: int, interpret: bool) -> None:
    """Polls ``counter`` until it reaches ``target``; in interpret mode (whose while loops take
    no atomics) a plain read, which the table's order has already met."""
    if interpret:
        poll = lambda *_: counter[0]
    elif _VOLATILE_POLL:
        poll = lambda *_: plt.load(counter.ref.at[counter.compose(0)], volatile=True)
    else:
        poll = lambda *_: atomic_add_first(counter, 0)
    jax.lax.while_loop(lambda seen: seen < target, poll, poll())
    if _VOLATILE_POLL and not interpret:
        atomic_add_first(counter, 0)


def _fused_kernel(
    tasks_ref,
    lengths_ref,
    q_ref,
    k_cmp_ref,
    v_cmp_ref,
    keys_ref,
    values_ref,
    _counters_in,
    chunk_max_ref,
    chunk_sum_ref,
    chunk_acc_ref,
    tile_max_ref,
    *refs,
    step: decode_step._StepGeometry,
    reads: decode._DecodeGeometry,
    kv_heads: int,
    prefetch: bool,
):
    """Runs tasks of ``tasks_ref [tasks, 3]`` until none is left. Inputs: ``lengths_ref
    [B, 1]``, ``q_ref [B, H, G', Dk]``, the caches; the rest are the three kernels'
    partials and outputs (see :func:`_buffers`) and ``counters [rows + 1, 4]`` (the queue
    at ``[rows, 0]``)."""
    sum_refs = refs[: 1 + step.has_back]
    (compressed_ref, picks_ref, scores_ref, blocks_ref, out_ref, read_max_ref, read_sum_ref, read_acc_ref) = (
        refs[1 + step.has_back : -1]
    )
    counters_ref = refs[-1]
    whole = slice(None)
    rows = counters_ref.shape[0] - 1

    def counter(row, column):
        return RefWindow(counters_ref, (row, pl.ds(column, 1)))

    def compress(b, h, row, chunk):
        tiles = pl.ds(chunk * step.tiles_per_chunk, step.tiles_per_chunk)
        columns = step.tiles_per_chunk * step.blocks_per_tile
        decode_step.compressed_chunk(
            chunk,
            RefWindow(lengths_ref, (b, whole)),
            RefWindow(q_ref, (b, h, whole, whole)),
            RefWindow(k_cmp_ref, (b, whole, h, whole)),
            RefWindow(v_cmp_ref, (b, whole, h, whole)),
            RefWindow(chunk_max_ref, (b, h, chunk, whole)),
            RefWindow(chunk_sum_ref, (b, h, chunk, whole)),
            RefWindow(chunk_acc_ref, (b, h, chunk, whole, whole)),
            RefWindow(tile_max_ref, (b, h, tiles, whole)),
            counter(row, _SELECT_TICKETS),
            *[RefWindow(ref, (b, h, whole, pl.ds(chunk * columns, columns))) for ref in sum_refs],
            geo=step,
        )
        _publish(counter(row, _CHUNKS_DONE), step.interpret)

    def select(b, h, row, part):
        _wait(counter(row, _CHUNKS_DONE), step.chunks, step.interpret)
        wrote_picks = decode_step.select_part(
            part,
            RefWindow(lengths_ref, (b, whole)),
            RefWindow(chunk_max_ref, (b, h, whole, whole)),
            RefWindow(chunk_sum_ref, (b, h, whole, whole)),
            RefWindow(chunk_acc_ref, (b, h, whole, whole, whole)),
            RefWindow(tile_max_ref, (b, h, whole, whole)),
            None,
            *[RefWindow(ref, (b, h, whole, whole)) for ref in sum_refs],
            RefWindow(compressed_ref, (b, h, whole, whole)),
            RefWindow(picks_ref, (b, h, 0, whole)),
            RefWindow(scores_ref, (b, h, whole)),
            RefWindow(blocks_ref, (b, h, whole)),
            counter(row, _SELECT_TICKETS),
            geo=step,
        )

        @pl.when(wrote_picks)
        def _():
            _publish(counter(row, _PICKS_WRITTEN), step.interpret)

    def read(b, h, row, group):
        @pl.when(group < reads.selected_programs)
        def _():
            _wait(counter(row, _PICKS_WRITTEN), 1, step.interpret)

        branch = 1 + (group >= reads.selected_programs).astype(jnp.int32)
        decode.read_items(
            group,
            RefWindow(lengths_ref, (b, whole)),
            RefWindow(picks_ref, (b, h, 0, whole)),
            RefWindow(q_ref, (b, h, whole, whole)),
            RefWindow(keys_ref, (branch, b, whole, h, whole)),
            RefWindow(values_ref, (branch, b, whole, h, whole)),
            None,
            RefWindow(out_ref, (whole, b, h, whole, whole)),
            RefWindow(read_max_ref, (b, h, whole, whole, whole)),
            RefWindow(read_sum_ref, (b, h, whole, whole, whole)),
            RefWindow(read_acc_ref, (b, h, whole, whole, whole, whole)),
            counter(row, _READ_TICKETS),
            geo=reads,
        )

    num_tasks = tasks_ref.shape[0]

    def entry(task):
        task = jnp.minimum(task, num_tasks - 1)
        return tasks_ref[task, 0], tasks_ref[task, 1], tasks_ref[task, 2]

    def run(kind, row, index):
        b = jax.lax.div(row, kv_heads)
        h = row - b * kv_heads
        for which, body in ((COMPRESS, compress), (SELECT, select), (READ, read)):
            pl.when(kind == which)(functools.partial(body, b, h, row, index))

    if step.interpret:
        # One program, the table in order (interpret mode's while loops take no atomics).
        jax.lax.fori_loop(0, num_tasks, lambda task, carry: run(*entry(task)), None)
        return

    def take():
        return atomic_add_first(counter(rows, 0), 1)

    if prefetch:

        def run_and_take(carry):
            task, *current = carry
            following = take()
            upcoming = entry(following)
            run(*current)
            return following, *upcoming

        first = take()
        jax.lax.while_loop(lambda carry: carry[0] < num_tasks, run_and_take, (first, *entry(first)))
        return

    def run_and_take_plain(task):
        run(*entry(task))
        return take()

    jax.lax.while_loop(lambda task: task < num_tasks, run_and_take_plain, take())


def _buffers(step, reads, batch: int, kv_heads: int, out_dtype) -> list[jax.ShapeDtypeStruct]:
    """Partials and outputs, in the kernel's order. Every row's slice of a buffer another
    task reads spans whole 128-byte lines (the picks get a second, unused row for that)."""
    f32 = jnp.float32
    chunked = (batch, kv_heads, step.chunks, step.rows)
    partials = (batch, kv_heads, 2, reads.partials, reads.rows)
    return [
        jax.ShapeDtypeStruct(chunked, f32),
        jax.ShapeDtypeStruct(chunked, f32),
        jax.ShapeDtypeStruct((*chunked, step.dv_padded), f32),
        jax.ShapeDtypeStruct((batch, kv_heads, step.num_tiles, step.rows), f32),
        *[jax.ShapeDtypeStruct((batch, kv_heads, step.rows, step.block_columns), f32)] * (1 + step.has_back),
        jax.ShapeDtypeStruct((batch, kv_heads, step.rows, step.dv_padded), out_dtype),
        jax.ShapeDtypeStruct(
            (batch, kv_heads, max(1, 32 // step.picks_padded), step.picks_padded), jnp.int32
        ),
        jax.ShapeDtypeStruct((batch, kv_heads, step.candidates), f32),
        jax.ShapeDtypeStruct((batch, kv_heads, step.candidates), jnp.int32),
        jax.ShapeDtypeStruct((2, batch, kv_heads, reads.rows, padded(reads.dv)), out_dtype),
        jax.ShapeDtypeStruct(partials, f32),
        jax.ShapeDtypeStruct(partials, f32),
        jax.ShapeDtypeStruct((*partials, padded(reads.dv)), f32),
        jax.ShapeDtypeStruct((batch * kv_heads + 1, 4), jnp.int32),
    ]


_STATIC = (
    "block_length",
    "block_stride",
    "selection_block_size",
    "num_selected",
    "window",
    "num_initial_blocks",
    "num_local_blocks",
    "scale",
    "launch",
    "interpret",
)


@functools.partial(jax.jit, static_argnames=_STATIC)
def fused_decode_step(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    lengths: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    window: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
    launch: FusedLaunch | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The three branch outputs of one decode step and its picks, in one launch.

    Args:
      q: ``[B, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]``; keys:
        ``[3, B, S, H, Dk]``; values: ``[3, B, S, H, Dv]``; lengths: int ``[B]`` in
        ``[1, min(S, Tc * d)]``, the query of row ``b`` at ``lengths[b] - 1``.
      launch: ``None`` for the default :class:`FusedLaunch`.

    Returns:
      ``(compressed, selected, window)``, each ``[B, HQ, Dv]`` in ``q.dtype``, and the
      block indices, int32 ``[B, H, n]`` (ascending, ``-1`` last).
    """
    launch = FusedLaunch() if launch is None else launch
    batch, q_heads, dk = q.shape
    kv_heads, dv = v_cmp.shape[2], v_cmp.shape[3]
    rows = batch * kv_heads
    step = decode_step._geometry(
        q,
        k_cmp,
        v_cmp,
        (launch.tile, launch.num_warps, launch.num_stages, rows * launch.chunks),
        (launch.num_warps, rows * launch.parts),
        interpret=interpret,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=float(scale),
    )
    windowed = decode.window_items(selection_block_size, window)
    per_row = -(-num_selected // launch.read_items) + -(-windowed // launch.read_items)
    reads = decode.reads_geometry(
        q,
        num_selected,
        values,
        selection_block_size,
        window,
        scale,
        (launch.num_warps, launch.num_stages, rows * per_row, 1),
        rows,
        interpret,
    )
    tasks = task_table(
        rows,
        step.chunks,
        step.parts,
        reads.selected_programs,
        reads.window_programs,
        launch.selection_lag,
        launch.reads_lag,
    )
    group = q_heads // kv_heads
    q4 = q.reshape(batch, kv_heads, group, dk)
    if step.rows != group:
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, step.rows - group), (0, 0)))
    buffers = _buffers(step, reads, batch, kv_heads, q.dtype)
    outputs = pl.pallas_call(
        functools.partial(_fused_kernel, step=step, reads=reads, kv_heads=kv_heads, prefetch=launch.prefetch),
        grid=(1 if interpret else min(launch.programs, len(tasks)),),
        out_shape=buffers,
        input_output_aliases={7: len(buffers) - 1},
        compiler_params=plt.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
        interpret=interpret,
        name="nsa_decode_fused",
    )(
        jnp.asarray(tasks),
        lengths.astype(jnp.int32)[:, None],
        q4,
        k_cmp,
        v_cmp,
        keys,
        values,
        jnp.zeros(buffers[-1].shape, jnp.int32),
    )
    compressed, picks, _, _, out = outputs[5 + step.has_back : 10 + step.has_back]
    heads = lambda x: x[..., :group, :dv].reshape(batch, q_heads, dv)
    return heads(compressed), heads(out[0]), heads(out[1]), picks[:, :, 0, :num_selected]


def check(
    q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, keys: jax.Array, values: jax.Array, lengths, **kwargs
) -> None:
    """Raises ``ValueError`` for inputs the fused step does not serve: those of
    :func:`pallas_kernels.gpu.decode_step.check`, and a value head dim that is not a power
    of two of at least 16 (its tasks load whole value rows)."""
    del keys, values
    decode_step.check(q, k_cmp, v_cmp, lengths, **kwargs)
    dv = v_cmp.shape[-1]
    if dv != padded(dv):
        raise ValueError(f"v_cmp's head dim must be a power of two >= 16 for the fused decode step, got {dv}")
    require_supported_dtype(q)
