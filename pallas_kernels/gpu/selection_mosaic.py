"""The selected-attention backward's key-tile kernel in Pallas Mosaic GPU (Hopper: TMA and wgmma).

Same work and outputs as the Triton tile kernel of :mod:`pallas_kernels.gpu.selection`
(spec, "Selected attention (Eq. 12)", "Kernel design"): one program per key tile of
``l' = 64`` keys, KV head and split, looping over the (query, slot) pairs of the tile's
inverse-map list (:mod:`pallas_kernels.gpu.inverse_map`), ``PAIRS`` pairs per step. It
accumulates the tile's dK and dV and writes each pair's dQ rows in list order.

Three warpgroups per program:

- the memory warpgroup reads each pair's query from the inverse map (a step ahead) and
  gathers the pair's ``G = 16`` rows of ``q`` and ``dout`` with bulk tensor copies (TMA),
  plus the step's entry ids and its pairs' log-sum-exp and ``delta`` rows (one copy each,
  from list order), into a ring of ``stages`` shared-memory slots, ``PAIRS * 16 = 64`` rows
  a slot, ahead of the two compute warpgroups;
- the front warpgroup computes, per step, with the key tile as the 64-row side of every
  warpgroup MMA: ``S^T = K Q^T`` and ``dP^T = V dO^T`` (issued together),
  ``P^T = exp2(S^T - lse)`` (causal mask) and ``dS^T = P^T (dP^T - delta)``, and hands
  ``P^T`` and ``dS^T`` (bf16, one pair of buffers per slot) to the back warpgroup;
- the back warpgroup accumulates ``dV += P^T dO`` and ``dK += dS^T Q``, computes
  ``dQ = dS K`` (``dS^T`` as a transposed MMA operand) and stores the step's ``64`` dQ
  rows by TMA while the next step runs: one store, as the step's pairs are adjacent in the
  list and dQ is written in list order (a store per pair, into ``[B, T, H, n, 16, Dk]``
  parts, took 1.4 ms more at T = 64K, D = 128; experiments/results/selection_h200.md,
  session 10).

The front runs up to ``stages`` steps ahead of the back, so the scores of one step overlap
the gradients of the one before; one warpgroup doing all five MMAs of a step in turn took
16.7 ms at T = 64K, D = 128, against 14.7 (session 11).

Served: bf16 or float16, no segments (aligned blocks), ``G = 16``, ``l' = 64``, head dims
multiples of 64 whose buffers fit in shared memory (Dk = Dv = 192 and Dk = 192 / Dv = 128 do,
Dk = 256 does not), on a Hopper GPU (sm_90) or in interpret mode (``supports``). ``delta``
and the inverse map are the Triton path's; the map comes from the forward where that ran keys to
queries (:mod:`pallas_kernels.gpu.selection_forward_mosaic`, which shares this module's program
lists and gather ring). The default at
Dk = Dv = 128 and Dk = 192 / Dv = 128 (``SelectionTuning.mosaic_backward``; 4 splits, 8 for the
16 longest lists): on the H200 at T = 64K forward+backward takes 34.3 ms on random blocks at
D = 128 (37.5 with one compute warpgroup and 8 splits; 39.5 with the per-pair dQ stores and the
batched inverse-map sort of sessions 5-9; 41.9 with the Triton tile kernel) and 50.3 at Dk = 192
(53.4; 55.1; Triton 74.4) (experiments/results/selection_h200.md, session 11).
At Dk = 192 dQ goes in 64-column pieces (see ``dq_columns``).

Besides the Triton path's buffers it gathers each listed pair's lse and delta rows into list
order (``2 * T * n * 16`` floats, 0.5 GB at T = 64K, H = 4): a step's rows are then one copy.
The dQ rows are summed per query by their :func:`list_positions` (a Pallas kernel in
:mod:`pallas_kernels.gpu.selection`, or :func:`sum_listed_rows`).
The kernel runs in Mosaic GPU interpret mode on CPU (``interpret=True``) with two differences:
the MMAs accumulate into fresh accumulators (``_accumulate``), and one warpgroup issues each
step's copies itself and then runs the front's and the back's work for the step, without the
other warpgroups and their ``consumed`` and ``ds_ready`` barriers (the interpreter runs
warpgroups as threads that block in barrier waits; on a 2-core CPU they can starve the CPU
client's worker threads and hang). The copies, slots, masks and math are the GPU path's; the
warpgroups' hand-offs are checked on the GPU (``experiments/check_selection_gpu.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax.cudnn import compute_capability

# (query, slot) pairs gathered per step: 4 pairs of 16 heads are the 64 columns of an MMA.
PAIRS = 4
_FRONT, _BACK, _MEMORY = 0, 1, 2
_HEADS = 16
_KEYS = 64
_ROWS = PAIRS * _HEADS
# Columns of dK/dV written out per float32 shared-memory piece.
_OUT_COLUMNS = 64
# TMA writes shared memory at 128-byte aligned addresses: a slot's entry ids take 32 ints.
_ALIGNED_INTS = 32
# Entry ids copied per step: from the 16-byte aligned id at or before the step's first, PAIRS more.
_ID_WINDOW = 2 * PAIRS


def _aligned(index: jax.Array) -> jax.Array:
    """``index`` rounded down to a multiple of 4 int32s (16 bytes)."""
    return jax.lax.div(index, 4) * 4


# Shared memory of one H100/H200 block (227 KB) minus room for barriers and alignment.
_SHARED_BYTES = 220 * 1024


def supports(
    *, aligned: bool, group: int, block_size: int, dk: int, dv: int, dtype: str, interpret: bool
) -> bool:
    """Whether this kernel serves the shape here (else the Triton tile kernel does): its
    warpgroup MMAs are Hopper's (sm_90; Blackwell has other MMA instructions), so compiled it
    needs a Hopper GPU; its buffers with two gather slots must fit in shared memory (not so
    from Dk = 256 on)."""
    dims_ok = all(d % 64 == 0 and d <= 256 for d in (dk, dv)) and _shared_bytes(dk, dv, 2) <= _SHARED_BYTES
    shape_ok = aligned and group == _HEADS and block_size == _KEYS
    return shape_ok and dims_ok and dtype in ("bfloat16", "float16") and (interpret or _on_hopper())


def _on_hopper() -> bool:
    return compute_capability()[0] == 9


def _shared_bytes(dk: int, dv: int, stages: int) -> int:
    """Shared memory of a program: the key/value tile, ``stages`` gather slots (each with its
    P^T and dS^T operands), the dQ rows and a float32 output piece."""
    two = 2
    tile = _KEYS * (dk + dv) * two
    slot = _ROWS * (dk + dv) * two + 2 * _ROWS * 4 + _ALIGNED_INTS * 4 + 2 * _KEYS * _ROWS * two
    return tile + stages * slot + _ROWS * dk * two + _KEYS * _OUT_COLUMNS * 4


def stages_for(dk: int, dv: int, wanted: int) -> int:
    """The deepest ring of gather slots, at most ``wanted``, that fits in shared memory."""
    stages = wanted
    while stages > 2 and _shared_bytes(dk, dv, stages) > _SHARED_BYTES:
        stages -= 1
    return stages


def _accumulate(mmas, accumulators: tuple[jax.Array, ...], interpret: bool) -> tuple[jax.Array, ...]:
    """The ``accumulators`` after the warpgroup MMAs that ``mmas(refs)`` issues into them.

    On the GPU the MMAs accumulate in place (one wait for all of them); interpret mode cannot
    run an MMA into an initialised accumulator, so there they go into zeroed ones, added after.
    """
    if not interpret:
        return pl.run_state(mmas)(tuple(plgpu.ACC.init(acc) for acc in accumulators))

    def fresh(*refs):
        mmas(refs)
        return tuple(ref[...] for ref in refs)

    increments = pl.run_scoped(fresh, *(plgpu.ACC(acc.shape, jnp.float32) for acc in accumulators))
    return tuple(acc + inc for acc, inc in zip(accumulators, increments, strict=True))


class ProgramList:
    """The part ``first .. last`` of a key tile's inverse-map list that one program takes (read in
    the kernel), in ``steps`` of ``PAIRS`` pairs."""

    def __init__(self, b, head, entries_ref, tile, first, last):
        self.b, self.head, self.entries_ref = b, head, entries_ref
        self.tile, self.first, self.last = tile, first, last
        self.steps = jax.lax.div(last - first + PAIRS - 1, PAIRS)

    @classmethod
    def split_tile(cls, b, head, entries_ref, offsets_ref, order_ref, programs: Programs, firsts_ref=None):
        """Grid axis ``rank``'s share of a tile (:class:`Programs`): ranks ``< heavy_tiles *
        heavy_splits`` split the first ``heavy_tiles`` tiles of ``order_ref`` ``heavy_splits``
        ways, the others ``splits`` ways, in shares of whole steps from the list's start (or from
        ``firsts_ref [B, H, num_tiles]``, whole steps into the list, where given). Sets
        ``tile_rank`` and ``split``."""
        rank = jax.lax.axis_index("rank")
        splits, heavy_tiles, heavy_splits = programs.splits, programs.heavy_tiles, programs.heavy_splits
        if heavy_tiles:
            heavy_ranks = heavy_tiles * heavy_splits
            heavy = rank < heavy_ranks
            light_rank = jnp.maximum(rank - heavy_ranks, 0)
            tile_rank = jnp.where(
                heavy, jax.lax.div(rank, heavy_splits), heavy_tiles + jax.lax.div(light_rank, splits)
            )
            split = jnp.where(heavy, jax.lax.rem(rank, heavy_splits), jax.lax.rem(light_rank, splits))
            sharing = jnp.where(heavy, heavy_splits, splits)
        else:
            tile_rank, split = jax.lax.div(rank, splits), jax.lax.rem(rank, splits)
            sharing = splits
        tile = order_ref[b, head, tile_rank]
        first, last = offsets_ref[b, head, tile], offsets_ref[b, head, tile + 1]
        if firsts_ref is not None:
            first = firsts_ref[b, head, tile]
        share = jax.lax.div(last - first + sharing * PAIRS - 1, sharing * PAIRS) * PAIRS
        first = jnp.minimum(first + split * share, last)
        program = cls(b, head, entries_ref, tile, first, jnp.minimum(first + share, last))
        program.tile_rank, program.split = tile_rank, split
        return program

    def queries_of(self, step, *, slots: int):
        """The queries of a step's PAIRS pairs (the last listed one again past the list; the
        first entry when the list is empty, never used then)."""
        start = self.first + step * PAIRS
        rows = [jnp.maximum(jnp.minimum(start + j, self.last - 1), 0) for j in range(PAIRS)]
        ids = [self.entries_ref[self.b, self.head, row] for row in rows]
        return tuple(jax.lax.div(ident, slots) for ident in ids)

    def copy_ids(self, start, ids_slot, barrier) -> None:
        """The entry ids of the step at list position ``start`` into ``ids_slot`` (a window from
        the 16-byte aligned id before it: bulk copies need aligned global addresses)."""
        window = self.entries_ref.at[self.b, self.head, pl.ds(_aligned(start), _ID_WINDOW)]
        plgpu.copy_gmem_to_smem(window, ids_slot.at[pl.ds(0, _ID_WINDOW)], barrier)

    def query_by_row(self, ids_slot, start, slots: int, row):
        """``row``'s shape, holding the query of pair ``row // 16`` of the step at ``start``
        (``-1`` past the program's list), from the ids :meth:`copy_ids` put in ``ids_slot``."""
        out = None
        for j in range(PAIRS - 1, -1, -1):
            query = jax.lax.div(ids_slot[start - _aligned(start) + j], slots)
            query = jnp.where(start + j < self.last, query, -1)
            out = query if out is None else jnp.where(row < (j + 1) * _HEADS, query, out)
        return out


@dataclasses.dataclass(frozen=True)
class Programs:
    """How the tile kernels split each key tile's inverse-map list over programs.

    ``splits`` programs a tile, each on an equal share of whole steps; the first ``heavy_tiles``
    tiles of the ``order`` given to the kernel (its longest lists, when ``order`` is heaviest first)
    get ``heavy_splits > splits`` each. ``heavy_first``: the grid is ``(H, rank, B)`` (heads
    interleaved at launch) instead of ``(rank, H, B)``.
    """

    splits: int
    heavy_first: bool
    heavy_tiles: int = 0
    heavy_splits: int = 0

    def __post_init__(self) -> None:
        if self.heavy_tiles < 0 or (self.heavy_tiles and self.heavy_splits <= self.splits):
            raise ValueError(
                "heavy_tiles must be >= 0, and heavy_splits > splits where heavy_tiles > 0; got "
                f"heavy_tiles={self.heavy_tiles}, heavy_splits={self.heavy_splits}, splits={self.splits}"
            )

    def for_tiles(self, num_tiles: int) -> Programs:
        """These programs with at most ``num_tiles`` heavy tiles."""
        return dataclasses.replace(self, heavy_tiles=min(self.heavy_tiles, num_tiles))

    def grid(
        self, batch: int, heads: int, num_tiles: int
    ) -> tuple[tuple[int, int, int], tuple[str, str, str]]:
        """The grid over :meth:`ProgramList.split_tile`'s ranks and its axis names."""
        ranks = self.heavy_tiles * self.heavy_splits + (num_tiles - self.heavy_tiles) * self.splits
        if self.heavy_first:
            return (heads, ranks, batch), ("head", "rank", "batch")
        return (ranks, heads, batch), ("rank", "head", "batch")


def whole_tiles(x: jax.Array, num_tiles: int) -> jax.Array:
    """``x [B, T, H, D]`` zero-padded to ``num_tiles`` whole key tiles along T."""
    return jnp.pad(x, ((0, 0), (0, num_tiles * _KEYS - x.shape[1]), (0, 0), (0, 0)))


def gather_ring(steps, stages: int, consumed, queries_of, issue_copies) -> None:
    """The memory warpgroup's loop: each step's copies (``issue_copies(step, queries)``) into
    slot ``step % stages`` once its last user released it on ``consumed``."""
    plgpu.set_max_registers(40, action="decrease")

    def gather(step, queries):
        # The next step's queries are read now and used a step later: the scalar loads'
        # latency overlaps this step's copies instead of delaying them.
        upcoming = queries_of(step + 1)

        @pl.when(step >= stages)
        def _():
            plgpu.barrier_wait(consumed.at[jax.lax.rem(step, stages)])

        issue_copies(step, queries)
        return upcoming

    jax.lax.fori_loop(0, steps, gather, queries_of(0))

    # Observe the last slots' releases too, so that every barrier phase has been seen.
    def drain(step, carry):
        plgpu.barrier_wait(consumed.at[jax.lax.rem(step, stages)])
        return carry

    jax.lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)


def tile_backward(
    q5: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do5: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    entries: jax.Array,
    offsets: jax.Array,
    order: jax.Array,
    *,
    slots: int,
    scale: float,
    programs: Programs,
    stages: int,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dK, dV and the dQ rows of selected attention, in list order.

    Args:
      q5: ``[B, T, H, 16, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``;
        do5: ``[B, T, H, 16, Dv]``; lse (base 2) and delta: float32 ``[B, T, H, 16]``
        (gathered here into list order).
      entries, offsets: the inverse map (``[B, H, T * n]``, ``[B, H, num_tiles + 1]``);
        order: int32 ``[B, H, num_tiles]``, the key tile of each program rank.
      slots: ``n``; scale: logit scale; programs: how the lists are split over programs
        (:class:`Programs`); each program writes float32 partial dK/dV (summed here); the heavy
        tiles' extra partials go to a compact ``[B, heavy_tiles * 64, H, heavy_splits - splits,
        D]`` buffer, so the partials summed stay ``splits`` per tile elsewhere. stages: gather
        slots in the ring.
      interpret: run in Mosaic GPU interpret mode (CPU), one warpgroup (see the module notes).

    Returns:
      ``(dk, dv, dq)``: float32 ``[B, T, H, Dk]`` (scaled) and ``[B, T, H, Dv]``, and
      ``dq [B, H, (T * n + 8) * 16, Dk]`` in ``q5.dtype``: rows
      ``16 i .. 16 i + 15`` hold the dQ of the pair ``entries[..., i]`` (rows of unlisted
      pairs and of the padding are left unwritten).
    """
    batch, length, heads, _, dk = q5.shape
    dv = v.shape[-1]
    num_tiles = offsets.shape[-1] - 1
    programs = programs.for_tiles(num_tiles)
    splits, heavy_tiles, heavy_splits = programs.splits, programs.heavy_tiles, programs.heavy_splits
    padded_length = num_tiles * _KEYS
    k, v = whole_tiles(k, num_tiles), whole_tiles(v, num_tiles)
    # Each listed pair's lse and delta rows in list order, so that a step's PAIRS rows are one
    # 256-byte copy: a pair's own 64 bytes would break TMA's 128-byte shared-memory alignment.
    queries = jax.lax.div(entries, slots)
    by_entry = jax.vmap(jax.vmap(lambda table, rows: table[rows]))
    lse, delta = (by_entry(jnp.swapaxes(x, 1, 2), queries).reshape(batch, heads, -1) for x in (lse, delta))
    # The last step's copies read past its first entry (ID window, PAIRS lse rows): keep them in bounds.
    entries = jnp.pad(entries, ((0, 0), (0, 0), (0, _ID_WINDOW)))
    lse, delta = (jnp.pad(x, ((0, 0), (0, 0), (0, _ROWS))) for x in (lse, delta))
    dtype = q5.dtype
    log2_scale = scale * math.log2(math.e)
    accumulate = functools.partial(_accumulate, interpret=interpret)
    # Interpret mode runs one warpgroup that issues each step's copies itself: the interpreter's
    # warpgroup threads block in barrier waits and can starve the CPU client's worker threads.
    inline = interpret
    # dQ's float32 accumulator beside dK's and dV's: at Dk = 192 a whole one would take the back
    # warpgroup past its 232 registers, so there dQ goes in 64-column pieces (one MMA and store each).
    width = dk if dk <= 128 else 64
    dq_columns = [pl.ds(start, width) for start in range(0, dk, width)]

    def kernel(
        entries_ref, offsets_ref, order_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
        dk_ref, dv_ref, dk_extra_ref, dv_extra_ref, dq_ref,
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ids_smem, p_smem, ds_smem, dq_smem,
        out_smem, kv_barrier, loaded, consumed, ds_ready,
    ):  # fmt: skip
        wg = jax.lax.axis_index("wg")
        head = jax.lax.axis_index("head")
        b = jax.lax.axis_index("batch")
        program = ProgramList.split_tile(b, head, entries_ref, offsets_ref, order_ref, programs)
        tile_rank, tile, split, first, last, steps = (
            program.tile_rank,
            program.tile,
            program.split,
            program.first,
            program.last,
            program.steps,
        )
        queries_of = functools.partial(program.queries_of, slots=slots)

        def issue_copies(step, queries):
            """Step ``step``'s gathers into its slot, completing on ``loaded``."""
            slot = jax.lax.rem(step, stages)
            start = first + step * PAIRS
            program.copy_ids(start, ids_smem.at[slot], loaded.at[slot])
            for src, dst in ((lse_ref, lse_smem), (delta_ref, delta_smem)):
                plgpu.copy_gmem_to_smem(
                    src.at[b, head, pl.ds(start * _HEADS, _ROWS)], dst.at[slot], loaded.at[slot]
                )
            for j, t in enumerate(queries):
                rows = pl.ds(j * _HEADS, _HEADS)
                for src, dst in ((q_ref, q_smem), (do_ref, do_smem)):
                    plgpu.copy_gmem_to_smem(src.at[b, t, head], dst.at[slot, rows], loaded.at[slot])

        pl.when(wg == _MEMORY)(lambda: gather_ring(steps, stages, consumed, queries_of, issue_copies))
        keys = pl.ds(tile * _KEYS, _KEYS)

        def live_pairs(start):
            return [start + j < last for j in range(PAIRS)]

        def store_dq(start, live):
            """The step's dQ rows to list positions ``start ..``: one copy for a full step;
            a partial one (the list's last) copies only its listed pairs, as the rows past
            them belong to the next list's first pairs."""
            full = live[PAIRS - 1]

            @pl.when(full)
            def _():
                rows = dq_ref.at[b, head, pl.ds(start * _HEADS, _ROWS)]
                plgpu.copy_smem_to_gmem(dq_smem, rows, commit_group=False)

            for j in range(PAIRS - 1):

                @pl.when(live[j] & jnp.logical_not(full))
                def _(j=j):
                    rows = dq_ref.at[b, head, pl.ds((start + j) * _HEADS, _HEADS)]
                    pair = dq_smem.at[pl.ds(j * _HEADS, _HEADS)]
                    plgpu.copy_smem_to_gmem(pair, rows, commit_group=False)

        def key_grid():
            """The ``[KEYS, ROWS]`` key position and column of every score, for ``front``."""
            iota = functools.partial(
                plgpu.broadcasted_iota, jnp.int32, (_KEYS, _ROWS), layout=plgpu.Layout.WGMMA
            )
            return tile * _KEYS + iota(0), iota(1)

        def front(step, key_position, column):
            """Step ``step``'s P^T and dS^T, handed to ``back`` through ``p_smem`` and ``ds_smem``."""
            slot = jax.lax.rem(step, stages)
            plgpu.barrier_wait(loaded.at[slot])
            start = first + step * PAIRS
            query_of_column = program.query_by_row(ids_smem.at[slot], start, slots, column)
            q_slot, do_slot = q_smem.at[slot], do_smem.at[slot]
            lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            visible = key_position <= query_of_column

            def scores(acc_s, acc_dp):
                plgpu.wgmma(acc_s, k_smem, q_slot.T)
                plgpu.wgmma(acc_dp, v_smem, do_slot.T)
                s_t = acc_s[...] if inline else plgpu.wgmma_accumulator_load(acc_s, wait_n=1)
                p_t = jnp.exp2(s_t * log2_scale - jax.lax.broadcast_in_dim(lse, (_KEYS, _ROWS), [1]))
                return jnp.where(visible, p_t, 0.0), acc_dp[...]

            acc = plgpu.ACC((_KEYS, _ROWS), jnp.float32)
            p_t, dp_t = pl.run_scoped(scores, acc, acc)
            ds_t = p_t * (dp_t - jax.lax.broadcast_in_dim(delta, (_KEYS, _ROWS), [1]))
            ds_smem[slot] = ds_t.astype(dtype)
            p_smem[slot] = p_t.astype(dtype)
            plgpu.commit_smem()
            if not inline:
                plgpu.barrier_arrive(ds_ready.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])

        def back(step, carry):
            """dV and dK accumulated (``carry``) and the step's dQ rows stored, from ``front``'s operands."""
            dk_acc, dv_acc = carry
            slot = jax.lax.rem(step, stages)
            if not inline:
                plgpu.barrier_wait(loaded.at[slot])
                plgpu.barrier_wait(ds_ready.at[slot])
            start = first + step * PAIRS
            q_slot, do_slot = q_smem.at[slot], do_smem.at[slot]
            p_slot, ds_slot = p_smem.at[slot], ds_smem.at[slot]

            def dq_piece(columns):
                """``dQ = dS K`` for the key tile's ``columns``, into a fresh accumulator."""
                zeros = plgpu.layout_cast(jnp.zeros((_ROWS, columns.size), jnp.float32), plgpu.Layout.WGMMA)
                return zeros, lambda ref: plgpu.wgmma(ref, ds_slot.T, k_smem.at[:, columns])

            first_zeros, first_dq = dq_piece(dq_columns[0])

            def grads(refs):
                dv_ref_, dk_ref_, dq_ref_ = refs
                plgpu.wgmma(dv_ref_, p_slot, do_slot)
                plgpu.wgmma(dk_ref_, ds_slot, q_slot)
                first_dq(dq_ref_)

            dv_acc, dk_acc, dq = accumulate(grads, (dv_acc, dk_acc, first_zeros))
            if not inline and len(dq_columns) == 1:
                plgpu.barrier_arrive(consumed.at[slot])
            # The last step's dQ stores must have read dq_smem before it is overwritten.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            dq_smem[:, dq_columns[0]] = (dq * scale).astype(dtype)
            for columns in dq_columns[1:]:
                zeros, mma = dq_piece(columns)
                (dq,) = accumulate(lambda refs, mma=mma: mma(refs[0]), (zeros,))
                dq_smem[:, columns] = (dq * scale).astype(dtype)
            if not inline and len(dq_columns) > 1:
                plgpu.barrier_arrive(consumed.at[slot])
            plgpu.commit_smem()
            store_dq(start, live_pairs(start))
            plgpu.commit_smem_to_gmem_group()
            return dk_acc, dv_acc

        def write_out(dk_acc, dv_acc):
            """The tile's dK (scaled) and dV out through one [64, 64] float32 buffer, a piece at a time."""
            outs = ((dk_acc * scale, dk_ref, dk_extra_ref, dk), (dv_acc, dv_ref, dv_extra_ref, dv))
            for acc, ref, extra_ref, width in outs:
                for column in range(0, width, _OUT_COLUMNS):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[...] = acc[:, column : column + _OUT_COLUMNS]
                    plgpu.commit_smem()
                    columns = pl.ds(column, _OUT_COLUMNS)

                    @pl.when(split < splits)
                    def _(ref=ref, columns=columns):
                        plgpu.copy_smem_to_gmem(out_smem, ref.at[b, keys, head, split, columns])

                    if heavy_tiles:

                        @pl.when(split >= splits)
                        def _(extra_ref=extra_ref, columns=columns):
                            rows = pl.ds(tile_rank * _KEYS, _KEYS)
                            partial = extra_ref.at[b, rows, head, split - splits, columns]
                            plgpu.copy_smem_to_gmem(out_smem, partial)

            plgpu.wait_smem_to_gmem(0)

        def zero_grads():
            return tuple(
                plgpu.layout_cast(jnp.zeros((_KEYS, width), jnp.float32), plgpu.Layout.WGMMA)
                for width in (dk, dv)
            )

        @pl.when(wg == _FRONT)
        def _front():
            if not inline:
                plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(k_ref.at[b, keys, head], k_smem, kv_barrier)
            plgpu.copy_gmem_to_smem(v_ref.at[b, keys, head], v_smem, kv_barrier)
            plgpu.barrier_wait(kv_barrier)
            key_position, column = key_grid()
            if inline:

                def whole_step(step, carry):
                    issue_copies(step, queries_of(step))
                    front(step, key_position, column)
                    return back(step, carry)

                write_out(*jax.lax.fori_loop(0, steps, whole_step, zero_grads()))
            else:
                pl.loop(0, steps)(lambda step: front(step, key_position, column))

        if not inline:

            @pl.when(wg == _BACK)
            def _back():
                plgpu.set_max_registers(232, action="increase")
                plgpu.barrier_wait(kv_barrier)
                write_out(*jax.lax.fori_loop(0, steps, back, zero_grads()))

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    transforms = (tiling, swizzle)
    scratch = [
        plgpu.SMEM((_KEYS, dk), dtype, transforms=transforms),
        plgpu.SMEM((_KEYS, dv), dtype, transforms=transforms),
        plgpu.SMEM((stages, _ROWS, dk), dtype, transforms=transforms),
        plgpu.SMEM((stages, _ROWS, dv), dtype, transforms=transforms),
        plgpu.SMEM((stages, _ROWS), jnp.float32),
        plgpu.SMEM((stages, _ROWS), jnp.float32),
        plgpu.SMEM((stages, _ALIGNED_INTS), jnp.int32),
        plgpu.SMEM((stages, _KEYS, _ROWS), dtype, transforms=transforms),
        plgpu.SMEM((stages, _KEYS, _ROWS), dtype, transforms=transforms),
        plgpu.SMEM((_ROWS, dk), dtype, transforms=transforms),
        plgpu.SMEM((_KEYS, _OUT_COLUMNS), jnp.float32),
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=3 + 2 * PAIRS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    ]
    grid, names = programs.grid(batch, heads, num_tiles)
    # Without heavy tiles the extra buffers are one unused tile, so the kernel's signature stays one.
    extra = (max(heavy_tiles, 1) * _KEYS, max(heavy_splits - splits, 1))
    out_type = [
        jax.ShapeDtypeStruct((batch, padded_length, heads, splits, dk), jnp.float32),
        jax.ShapeDtypeStruct((batch, padded_length, heads, splits, dv), jnp.float32),
        jax.ShapeDtypeStruct((batch, extra[0], heads, extra[1], dk), jnp.float32),
        jax.ShapeDtypeStruct((batch, extra[0], heads, extra[1], dv), jnp.float32),
        jax.ShapeDtypeStruct((batch, heads, entries.shape[-1] * _HEADS, dk), dtype),
    ]
    dk_out, dv_out, dk_extra, dv_extra, dq = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=names,
        num_threads=1 if inline else 3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="nsa_selected_bwd_mosaic",
    )(entries, offsets, order, q5, k, v, do5, lse, delta)
    dk_out, dv_out = jnp.sum(dk_out, axis=3), jnp.sum(dv_out, axis=3)
    if heavy_tiles:
        heavy = order[..., :heavy_tiles]
        dk_out, dv_out = _add_heavy(dk_out, dk_extra, heavy), _add_heavy(dv_out, dv_extra, heavy)
    return dk_out[:, :length], dv_out[:, :length], dq


def _add_heavy(summed: jax.Array, extra: jax.Array, heavy: jax.Array) -> jax.Array:
    """``summed [B, T', H, D]`` plus the heavy tiles' extra partials ``[B, K * 64, H, S, D]``
    (by rank) at their tiles ``heavy [B, H, K]`` (distinct per row, so the adds do not collide)."""
    batch, padded_length, heads, width = summed.shape
    count = heavy.shape[-1]
    extra = jnp.sum(extra, axis=3).reshape(batch, count, _KEYS, heads, width)
    tiles = summed.reshape(batch, padded_length // _KEYS, _KEYS, heads, width)
    b = jnp.arange(batch)[:, None, None]
    h = jnp.arange(heads)[None, :, None]
    tiles = tiles.at[b, heavy, :, h, :].add(jnp.transpose(extra, (0, 3, 1, 2, 4)))
    return tiles.reshape(summed.shape)


def list_positions(entries: jax.Array, listed: jax.Array) -> jax.Array:
    """int32 ``[B, T, H, n]``: the list position of each (query, slot) pair, ``-1`` if unlisted.

    Args:
      entries: the inverse map's ``[B, H, T * n]`` pair ids (a permutation of ``0 .. T*n-1``).
      listed: bool ``[B, T, H, n]``, the pairs the map lists under a tile (the others' dQ
        rows are never written by :func:`tile_backward`).
    """
    batch, length, heads, slots = listed.shape
    if entries.shape != (batch, heads, length * slots):
        raise ValueError(
            f"entries must be [B, H, T * n] = {(batch, heads, length * slots)} for listed of shape "
            f"{listed.shape}, got {entries.shape}"
        )
    by_pair = jnp.arange(entries.shape[-1], dtype=jnp.int32)
    positions = jax.vmap(jax.vmap(lambda ids: jnp.zeros_like(ids).at[ids].set(by_pair)))(entries)
    positions = jnp.transpose(positions.reshape(batch, heads, length, slots), (0, 2, 1, 3))
    return jnp.where(listed, positions, -1)


def sum_listed_rows(rows: jax.Array, positions: jax.Array) -> jax.Array:
    """dQ ``[B, T, H, 16, Dk]`` in float32 (XLA): each query's listed pairs' rows summed.

    Args:
      rows: ``[B, H, R, Dk]``, the dQ rows of :func:`tile_backward` in list order.
      positions: ``[B, T, H, n]`` from :func:`list_positions`.

    The rows are gathered by list position and summed in slot order: deterministic.
    """
    batch, heads, num_rows, dk = rows.shape
    length, slots = positions.shape[1], positions.shape[3]
    if positions.shape != (batch, length, heads, slots) or num_rows < length * slots * _HEADS:
        raise ValueError(
            f"rows [B, H, R, Dk] and positions [B, T, H, n] must share B and H with "
            f"R >= T * n * {_HEADS}, got {rows.shape} and {positions.shape}"
        )
    by_head = jnp.transpose(positions, (0, 2, 1, 3))
    pairs = by_head.reshape(batch, heads, length * slots)
    by_pair = rows[:, :, : length * slots * _HEADS].reshape(batch, heads, length * slots, _HEADS, dk)
    gathered = jax.vmap(jax.vmap(lambda table, at: table[at]))(by_pair, jnp.maximum(pairs, 0))
    gathered = gathered.reshape(batch, heads, length, slots, _HEADS, dk).astype(jnp.float32)
    keep = (by_head >= 0)[..., None, None]
    return jnp.transpose(jnp.sum(jnp.where(keep, gathered, 0.0), axis=3), (0, 2, 1, 3, 4))
