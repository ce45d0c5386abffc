"""Kernel-specific tests of the pallas_triton selected attention (interpret mode on CPU).

The shared oracle tests live in ``tests/test_selected_attention.py``; these cover the
pieces behind the kernel: the inverse block -> query map, the key starts, launch
variants, and shapes the shared tests leave out.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from pallas_kernels.gpu import forced_merge, selection, selection_mosaic, shared_blocks
from pallas_kernels.gpu.block_sizes import DEFAULT_TUNING, SelectionTuning, tuning_for
from pallas_kernels.gpu.inverse_map import build_inverse_map, key_tile_count, listed_parts
from tests.conftest import jitted_vjp


def _random_starts(rng, batch, length, heads, slots, block_size, aligned):
    """int32 [B, T, H, n] key starts at or before each query, -1 for some slots."""
    query = np.arange(length)[None, :, None, None]
    if aligned:
        blocks = rng.integers(-1, length // block_size + 1, (batch, length, heads, slots))
        starts = blocks * block_size
    else:
        starts = rng.integers(-1, length, (batch, length, heads, slots))
    starts = np.where((starts >= 0) & (starts <= query), starts, -1)
    return jnp.asarray(starts, jnp.int32)


def _expected_lists(starts, block_size, aligned):
    """Brute force: {(b, h, tile): sorted ids} of the pairs touching each tile."""
    starts = np.asarray(starts)
    batch, length, heads, slots = starts.shape
    parts = 1 if aligned else 2
    lists = {}
    for b, t, h, i in np.ndindex(batch, length, heads, slots):
        start = starts[b, t, h, i]
        if start < 0:
            continue
        touched = range(start // block_size, (start + block_size - 1) // block_size + 1)
        for part, tile in enumerate(touched):
            if tile < key_tile_count(length, block_size):
                lists.setdefault((b, h, tile), []).append((t * slots + i) * parts + part)
    return lists


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "straddling"])
def test_inverse_map_lists_every_pair_once_under_its_tiles(aligned):
    rng = np.random.default_rng(0)
    block_size, length = 8, 45
    starts = _random_starts(rng, 2, length, 3, 4, block_size, aligned)
    entries, offsets = build_inverse_map(starts, block_size=block_size, aligned=aligned)
    entries, offsets = np.asarray(entries), np.asarray(offsets)
    expected = _expected_lists(starts, block_size, aligned)
    num_tiles = key_tile_count(length, block_size)
    assert offsets.shape == (2, 3, num_tiles + 1)
    for b, h in np.ndindex(2, 3):
        assert offsets[b, h, 0] == 0 and np.all(np.diff(offsets[b, h]) >= 0)
        for tile in range(num_tiles):
            got = entries[b, h, offsets[b, h, tile] : offsets[b, h, tile + 1]]
            assert sorted(got.tolist()) == sorted(expected.get((b, h, tile), [])), (b, h, tile)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "straddling"])
def test_listed_parts_matches_inverse_map(aligned):
    rng = np.random.default_rng(1)
    block_size, length, slots = 8, 37, 3
    starts = _random_starts(rng, 1, length, 2, slots, block_size, aligned)
    entries, offsets = build_inverse_map(starts, block_size=block_size, aligned=aligned)
    listed = np.asarray(listed_parts(starts, block_size=block_size, aligned=aligned))
    parts = 1 if aligned else 2
    for h in range(2):
        owned = np.asarray(entries[0, h, : offsets[0, h, -1]])
        flags = np.zeros(length * slots * parts, bool)
        flags[owned] = True
        np.testing.assert_array_equal(flags, listed[0, :, h].reshape(-1))


def test_list_positions_invert_the_map_and_rows_sum_by_them():
    # The Mosaic tile kernel's dQ rows are in list order; summing them by list position must give
    # each query the sum over its listed slots, in any list order.
    rng = np.random.default_rng(2)
    length, heads, slots, block_size, dk = 21, 2, 3, 8, 4
    starts = _random_starts(rng, 1, length, heads, slots, block_size, True)
    entries, _ = build_inverse_map(starts, block_size=block_size, aligned=True)
    listed = listed_parts(starts, block_size=block_size, aligned=True)
    positions = selection_mosaic.list_positions(entries, listed)
    parts = rng.standard_normal((1, length, heads, slots, 16, dk)).astype(np.float32)
    rows = np.zeros((1, heads, (length * slots + 1) * 16, dk), np.float32)
    for h in range(heads):
        for i, ident in enumerate(np.asarray(entries[0, h])):
            rows[0, h, 16 * i : 16 * i + 16] = parts[0, ident // slots, h, ident % slots]
    expected = np.sum(np.where(np.asarray(listed)[..., None, None], parts, 0.0), axis=3)
    got = selection_mosaic.sum_listed_rows(jnp.asarray(rows), positions)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="entries must be"):
        selection_mosaic.list_positions(entries[..., 1:], listed)
    with pytest.raises(ValueError, match="R >= T"):
        selection_mosaic.sum_listed_rows(jnp.asarray(rows[:, :, :16]), positions)


def test_key_starts_follow_segments_and_drop_future_blocks():
    segment_ids = jnp.asarray([[0] * 5 + [1] * 7])
    indices = jnp.zeros((1, 12, 1, 3), jnp.int32).at[..., 1].set(1).at[..., 2].set(-1)
    starts = np.asarray(selection.selected_key_starts(indices, segment_ids, 4))[0, :, 0]
    np.testing.assert_array_equal(starts[:, 0], [0] * 5 + [5] * 7)
    np.testing.assert_array_equal(starts[:, 1], [-1, -1, -1, -1, 4, -1, -1, -1, -1, 9, 9, 9])
    assert np.all(starts[:, 2] == -1)


def _inputs(seed, batch, length, q_heads, kv_heads, dk, dv, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, q_heads, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dk), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dv), jnp.float32).astype(dtype)
    ct = jax.random.normal(keys[3], (batch, length, q_heads, dv), jnp.float32).astype(dtype)
    return q, k, v, ct


def _indices(seed, batch, length, heads, slots, block_size):
    """Distinct random blocks (any order, some -1), within range."""
    rng = np.random.default_rng(seed)
    num_blocks = -(-length // block_size)
    picks = np.stack(
        [rng.permutation(num_blocks + slots)[:slots] for _ in range(batch * length * heads)]
    ).reshape(batch, length, heads, slots)
    return jnp.asarray(np.where(picks < num_blocks, picks, -1), jnp.int32)


def _relative_error(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _compare(q, k, v, ct, indices, block_size, tolerance, segment_ids=None, tuning=None):
    scale = q.shape[-1] ** -0.5

    def ours(q, k, v):
        if tuning is None:
            return nsa_jax.selected_attention(
                q,
                k,
                v,
                indices,
                block_size=block_size,
                segment_ids=segment_ids,
                implementation="pallas_triton",
            )
        return selection.selected_attention(
            q,
            k,
            v,
            indices,
            block_size=block_size,
            scale=scale,
            segment_ids=segment_ids,
            interpret=True,
            tuning=tuning,
        )

    def reference(q, k, v):
        return nsa_jax.selected_attention(
            q, k, v, indices, block_size=block_size, segment_ids=segment_ids, implementation="xla"
        )

    out, grads = jitted_vjp(ours, (q, k, v), ct)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_grads = jitted_vjp(reference, f32, ct.astype(jnp.float32))
    assert out.dtype == q.dtype and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert _relative_error(out, ref) < tolerance
    for name, grad, ref_grad in zip("qkv", grads, ref_grads, strict=True):
        assert grad.dtype == q.dtype, name
        assert _relative_error(grad, ref_grad) < tolerance, name


@pytest.mark.parametrize(
    "shape",
    [
        (1, 130, 4, 4, 32, 16, 32, 3),  # G = 1, odd T, 32-key blocks
        (1, 40, 32, 2, 192, 128, 16, 2),  # paper head dims, G = 16, tiny T
        (2, 67, 6, 2, 20, 12, 12, 4),  # G = 3, block size 12: nothing a power of two
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_odd_shapes_match_reference_float32(shape):
    batch, length, q_heads, kv_heads, dk, dv, block_size, slots = shape
    q, k, v, ct = _inputs(5, batch, length, q_heads, kv_heads, dk, dv, jnp.float32)
    indices = _indices(5, batch, length, kv_heads, slots, block_size)
    _compare(q, k, v, ct, indices, block_size, 2e-5)


def test_bfloat16_paper_head_dims_with_segments():
    q, k, v, ct = _inputs(6, 1, 48, 16, 1, 192, 128, jnp.bfloat16)
    indices = _indices(6, 1, 48, 1, 3, 16)
    segment_ids = jnp.asarray([[0] * 21 + [1] * 27])
    _compare(q, k, v, ct, indices, 16, 1.5e-2, segment_ids=segment_ids)


def _neighbour_indices(seed, batch, length, heads, slots, num_blocks, queries):
    """Random blocks in which each group of ``queries`` positions lists a common block in its
    first two slots (at times twice), the other slots random, some repeated, some -1."""
    rng = np.random.default_rng(seed)
    groups = -(-length // queries)
    common = rng.integers(0, num_blocks, (batch, groups, heads, 2))
    common[..., 1] = np.where(rng.random(common.shape[:-1]) < 0.3, common[..., 0], common[..., 1])
    picks = rng.integers(-1, num_blocks, (batch, groups * queries, heads, slots))
    picks[..., :2] = np.repeat(common, queries, axis=1)
    picks[..., -1] = np.where(rng.random(picks.shape[:-1]) < 0.2, picks[..., 2], picks[..., -1])
    return jnp.asarray(picks[:, :length], jnp.int32)


@pytest.mark.parametrize("queries", [2, 4])
def test_shared_split_keeps_each_list_as_a_multiset(queries):
    starts = selection.selected_key_starts(_neighbour_indices(1, 2, 23, 3, 5, 6, queries), None, 4)
    shared, private = (np.asarray(x) for x in shared_blocks.split_shared_starts(starts, queries))
    starts = np.asarray(starts)
    groups = -(-23 // queries)
    assert shared.shape == (2, groups, 3, 5) and private.shape == (2, groups * queries, 3, 5)
    shared_items = 0
    for b, t, h in np.ndindex(*starts.shape[:3]):
        listed = sorted(x for x in starts[b, t, h] if x >= 0)
        common = [x for x in shared[b, t // queries, h] if x >= 0]
        own = [x for x in private[b, t, h] if x >= 0]
        assert sorted(common + own) == listed, (b, t, h)
        shared_items += len(common)
    for lists in (shared, private):  # compacted: the starts first, then -1
        count = np.sum(lists >= 0, axis=-1, keepdims=True)
        assert np.all((lists >= 0) == (np.arange(lists.shape[-1]) < count))
    assert shared_items > 0  # the inputs do share blocks
    assert np.all(private[:, 23:] == -1)  # the padding position of the last group selects nothing
    with pytest.raises(ValueError, match="queries must be >= 1"):
        shared_blocks.split_shared_starts(jnp.asarray(starts), 0)
    with pytest.raises(ValueError, match=r"key_starts must be \[B, T, H, n\]"):
        shared_blocks.split_shared_starts(jnp.asarray(starts[0]), queries)


@pytest.mark.parametrize("queries", [2, 4, 8])
def test_forward_over_several_positions_matches_reference(queries):
    # T = 50: the last group of 4 or 8 positions runs past T; segments cut a group.
    q, k, v, ct = _inputs(9, 1, 50, 4, 2, 48, 24, jnp.float32)
    indices = _neighbour_indices(9, 1, 50, 2, 5, 7, queries)
    segment_ids = jnp.asarray([[0] * 13 + [1] * 37])
    tuning = dataclasses.replace(DEFAULT_TUNING, fwd_queries=queries)
    _compare(q, k, v, ct, indices, 8, 2e-5, segment_ids=segment_ids, tuning=tuning)


def test_paper_dk192_default_reads_two_positions_a_program():
    assert tuning_for(192, 128).fwd_queries == 2 and tuning_for(128, 128).fwd_queries == 1
    q, k, v, ct = _inputs(10, 1, 45, 16, 1, 192, 128, jnp.bfloat16)
    indices = _neighbour_indices(10, 1, 45, 1, 4, 3, 2)
    _compare(q, k, v, ct, indices, 16, 1.5e-2)


@pytest.mark.parametrize(
    "tuning",
    [
        SelectionTuning(
            bwd_rows=16,
            bwd_rows_major=False,
            bwd_heavy_first=True,
            bwd_splits=3,
            dq_sum_kernel=True,
            dq_transposed=True,
        ),
        SelectionTuning(bwd_rows=128, bwd_rows_major=True, split_head_dims=False),
        SelectionTuning(bwd_rows=32, bwd_rows_major=True, dq_transposed=True),
    ],
    ids=[
        "keys_major_16_heavy_first_3_splits_sum_kernel_dq_transposed",
        "rows_major_128_unsplit",
        "rows_major_32_dq_transposed",
    ],
)
def test_backward_variants_match_reference(tuning):
    # Dk = 48: column tiles 32 + 16 when split, one of 64 when not; Dv = 24: one of 32.
    q, k, v, ct = _inputs(7, 1, 50, 4, 2, 48, 24, jnp.float32)
    indices = _indices(7, 1, 50, 2, 4, 8)
    segment_ids = jnp.asarray([[0] * 13 + [1] * 37])
    _compare(q, k, v, ct, indices, 8, 2e-5, segment_ids=segment_ids, tuning=tuning)


@pytest.mark.parametrize(
    ("dk", "tuning"),
    [
        (128, tuning_for(128, 128)),
        (
            128,
            dataclasses.replace(
                tuning_for(128, 128), mosaic_splits=3, bwd_heavy_first=False, mosaic_heavy_tiles=0
            ),
        ),
        (192, dataclasses.replace(tuning_for(192, 128), mosaic_splits=2)),
        (
            128,
            dataclasses.replace(
                tuning_for(128, 128), mosaic_splits=2, mosaic_heavy_tiles=1, mosaic_heavy_splits=3
            ),
        ),
        (128, dataclasses.replace(tuning_for(128, 128), mosaic_forward=False)),
        (
            192,
            dataclasses.replace(
                tuning_for(192, 128),
                mosaic_splits=3,
                bwd_heavy_first=False,
                mosaic_heavy_tiles=0,
                mosaic_fwd_stages=2,
            ),
        ),
    ],
    ids=[
        "d128_default_splits",
        "d128_three_splits_tile_order",
        "dk192_two_splits",
        "d128_heaviest_tile_three_splits_others_two",
        "d128_triton_forward_mosaic_backward",
        "dk192_keys_to_queries_forward_three_splits_two_slots",
    ],
)
def test_mosaic_tile_kernel_matches_reference(dk, tuning):
    # bf16, G = 16, 64-key blocks, no segments: what selection_mosaic serves; T = 150 is no
    # multiple of 64, so the last key tile is partial and the last step has dead pairs.
    q, k, v, ct = _inputs(9, 1, 150, 16, 1, dk, 128, jnp.bfloat16)
    indices = _indices(9, 1, 150, 1, 3, 64)
    assert selection._uses_mosaic(_geometry(q, v, tuning))
    _compare(q, k, v, ct, indices, 64, 1.5e-2, tuning=tuning)


def _forced_indices(seed, length, slots, block_size, duplicates):
    """``[1, T, 1, n]`` selections as the spec's top-n makes them (Eq. 11: block 0 and the query's
    two local blocks, then other visible blocks), in random slot order, except that a fifth of
    the rows leave the query's own block out; with ``duplicates`` a third list a forced block twice."""
    rng = np.random.default_rng(seed)
    rows = np.full((length, slots), -1, np.int32)
    for t in range(length):
        own = t // block_size
        forced = [0] + [b for b in (own - 1, own) if b >= 1]
        picks = forced + [b for b in rng.permutation(own + 1) if b not in forced]
        if duplicates and rng.random() < 1 / 3:
            picks.insert(1, forced[-1])
        if rng.random() < 0.2:
            picks = [b for b in picks if b != own or own == 0]
        picks = picks[:slots]
        rng.shuffle(picks)
        rows[t, : len(picks)] = picks
    return jnp.asarray(rows[None, :, None, :])


@pytest.mark.parametrize(("dk", "duplicates"), [(128, True), (192, False)], ids=["d128_duplicates", "dk192"])
def test_forced_blocks_match_reference(dk, duplicates):
    # T = 300: five key tiles, so tiles have forced prefixes and pairs past them; heavy tile 0
    # (every pair forced) and the others split two ways.
    q, k, v, ct = _inputs(9, 1, 300, 16, 1, dk, 128, jnp.bfloat16)
    indices = _forced_indices(3, 300, 4, 64, duplicates)
    tuning = dataclasses.replace(
        tuning_for(dk, 128),
        forced_merge=True,
        mosaic_splits=2,
        mosaic_heavy_tiles=1,
        mosaic_heavy_splits=3,
    )
    _compare(q, k, v, ct, indices, 64, 1.5e-2, tuning=tuning)


def test_forced_pairs_are_a_prefix_of_each_list():
    length, slots, block_size, step = 300, 4, 64, 4
    indices = _forced_indices(5, length, slots, block_size, duplicates=True)
    key_starts = selection.selected_key_starts(indices, None, block_size)
    forced, counts = forced_merge.forced_pairs(key_starts, block_size)
    starts = np.asarray(key_starts)[0, :, 0]
    own = np.arange(length)[:, None] // block_size
    tile = starts // block_size
    expected = (starts >= 0) & ((tile == 0) | (tile == own) | (tile == own - 1))
    np.testing.assert_array_equal(np.asarray(forced)[0, :, 0], expected)
    on = lambda candidate: np.sum((starts >= 0) & candidate, axis=-1)
    expected_counts = [on(tile == 0), on((tile >= 1) & (tile == own - 1)), on((tile >= 1) & (tile == own))]
    np.testing.assert_array_equal(np.asarray(counts)[0, :, 0, :3], np.stack(expected_counts, axis=-1))
    entries, offsets = build_inverse_map(key_starts, block_size=block_size, aligned=True)
    firsts = np.asarray(forced_merge.list_firsts(offsets, counts, block_size, step))[0, 0]
    entries, offsets = np.asarray(entries)[0, 0], np.asarray(offsets)[0, 0]
    flags = expected.reshape(-1)
    prefixes = []
    for a in range(len(offsets) - 1):
        listed = flags[entries[offsets[a] : offsets[a + 1]]]
        prefix = int(np.argmin(listed)) if not listed.all() else len(listed)
        assert not listed[prefix:].any(), a  # the forced pairs come first
        assert firsts[a] == offsets[a] + prefix // step * step, a
        prefixes.append((prefix, len(listed)))
    assert prefixes[0][0] == prefixes[0][1]  # every pair of tile 0 is forced
    assert sum(0 < prefix < total for prefix, total in prefixes) >= 2  # tiles holding both kinds


def test_forced_merge_rejects_queries_not_dividing_the_block():
    q, k, v, _ = _inputs(1, 1, 64, 16, 1, 64, 64, jnp.bfloat16)
    geo = _geometry(q, v, dataclasses.replace(tuning_for(128, 128), forced_merge=True, merge_queries=128))
    counts = jnp.zeros((1, 64, 1, 4), jnp.int32)
    forced_rows = jnp.full((1, 64, 1), -1, jnp.int32)
    rows, lse_rows = jnp.zeros((1, 1, 16, 64), jnp.bfloat16), jnp.zeros((1, 1, 16), jnp.float32)
    with pytest.raises(ValueError, match="merge_queries must divide the block size 64, got 128"):
        forced_merge.attend_forced(q, k, v, counts, forced_rows, rows, lse_rows, geo)


@pytest.mark.parametrize("dk", [128, 192])
def test_mosaic_path_lowers_for_an_h200(dk, monkeypatch):
    # The Mosaic GPU and Triton kernels lowered for an abstract H200 (no GPU here): what interpret
    # mode does not run, the lowering of each kernel body to Mosaic GPU or Triton IR, is checked.
    from experiments.kernel_resources import lower_for_h200

    monkeypatch.setattr(selection_mosaic, "_on_hopper", lambda: True)
    tuning = dataclasses.replace(tuning_for(dk, 128), forced_merge=True)
    length = 1000

    def forward_backward(q, k, v, indices, ct):
        attend = lambda q, k, v: selection.selected_attention(
            q, k, v, indices, block_size=64, scale=0.1, tuning=tuning
        )
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(ct)

    shapes = [
        jax.ShapeDtypeStruct((1, length, 64, dk), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, length, 4, dk), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, length, 4, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, length, 4, 16), jnp.int32),
        jax.ShapeDtypeStruct((1, length, 64, 128), jnp.bfloat16),
    ]
    kernels = set(re.findall(r"nsa_[a-z_]+", lower_for_h200(forward_backward, *shapes)))
    assert {"nsa_selected_fwd_mosaic", "nsa_selected_bwd_mosaic", "nsa_selected_fwd_forced"} <= kernels


def _geometry(q, v, tuning, aligned=True, block_size=64, interpret=True):
    return selection._Geometry(
        length=q.shape[1],
        block_size=block_size,
        slots=3,
        group=16,
        dk=q.shape[-1],
        dv=v.shape[-1],
        scale=1.0,
        aligned=aligned,
        dtype=jnp.dtype(q.dtype).name,
        interpret=interpret,
        tuning=tuning,
    )


def test_mosaic_tile_kernel_serves_only_its_shapes():
    q, _, v, _ = _inputs(0, 1, 8, 16, 1, 128, 128, jnp.bfloat16)
    mosaic = tuning_for(128, 128)  # the default at Dk = Dv = 128, as at Dk = 192 / Dv = 128
    assert mosaic.mosaic_backward and tuning_for(192, 128).mosaic_backward
    assert mosaic.mosaic_forward and tuning_for(192, 128).mosaic_forward
    assert not DEFAULT_TUNING.mosaic_backward  # untuned head dims keep the Triton kernel
    assert selection._uses_mosaic(_geometry(q, v, mosaic))
    assert not selection._uses_mosaic(_geometry(q, v, mosaic, aligned=False))  # packed segments
    assert not selection._uses_mosaic(_geometry(q, v, mosaic, block_size=32))
    assert not selection._uses_mosaic(_geometry(q.astype(jnp.float32), v, mosaic))
    assert not selection._uses_mosaic(_geometry(q[..., :96], v, mosaic))  # Dk not a multiple of 64
    wide = jnp.concatenate([q, q], axis=-1)
    assert selection._uses_mosaic(_geometry(wide[..., :192], wide[..., :192], mosaic))
    assert not selection._uses_mosaic(_geometry(wide, v, mosaic))  # Dk = 256: shared memory is short
    assert not selection._uses_mosaic(_geometry(q, v, dataclasses.replace(mosaic, mosaic_backward=False)))
    # Compiled (not interpreted) it needs a Hopper GPU: not this CPU.
    assert not selection._uses_mosaic(_geometry(q, v, mosaic, interpret=False))


def test_tuning_table_and_bad_tuning():
    assert tuning_for(192, 128) != tuning_for(128, 128)
    assert tuning_for(100, 128) == tuning_for(128, 128)
    with pytest.raises(ValueError, match="bwd_rows"):
        SelectionTuning(bwd_rows=48)
    with pytest.raises(ValueError, match="fwd_queries must be a power of two"):
        SelectionTuning(fwd_queries=3)
    with pytest.raises(ValueError, match="fwd_queries must be positive"):
        SelectionTuning(fwd_queries=0)
    with pytest.raises(ValueError, match="merge_queries must be a power of two"):
        SelectionTuning(merge_queries=48)
    with pytest.raises(ValueError, match="mosaic_heavy_tiles needs bwd_heavy_first"):
        SelectionTuning(mosaic_heavy_tiles=2, mosaic_heavy_splits=16)  # tile order, not heaviest first
    with pytest.raises(ValueError, match="mosaic_heavy_splits > mosaic_splits"):
        SelectionTuning(bwd_heavy_first=True, mosaic_heavy_tiles=2, mosaic_heavy_splits=8)


def test_mosaic_programs_reject_heavy_splits_below_splits():
    with pytest.raises(ValueError, match="heavy_splits > splits"):
        selection_mosaic.Programs(splits=4, heavy_first=True, heavy_tiles=1, heavy_splits=4)
    with pytest.raises(ValueError, match="heavy_tiles must be >= 0"):
        selection_mosaic.Programs(splits=4, heavy_first=True, heavy_tiles=-1, heavy_splits=8)
    programs = selection_mosaic.Programs(splits=2, heavy_first=True, heavy_tiles=5, heavy_splits=3)
    assert programs.for_tiles(4).heavy_tiles == 4
    assert programs.for_tiles(4).grid(1, 2, 4) == ((2, 12, 1), ("head", "rank", "batch"))


def test_slot_order_does_not_matter():
    q, k, v, _ = _inputs(8, 1, 33, 4, 2, 16, 8, jnp.float32)
    indices = _indices(8, 1, 33, 2, 4, 8)
    run = lambda i: nsa_jax.selected_attention(q, k, v, i, block_size=8, implementation="pallas_triton")
    np.testing.assert_allclose(run(indices), run(indices[..., ::-1]), rtol=1e-5, atol=1e-6)


def test_check_refuses_float64():
    x = np.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="q"):
        selection.check(x, x, x, np.zeros((1, 4, 2, 1), np.int32), block_size=4, scale=1.0)


@pytest.mark.parametrize("dk", [128, 192], ids=["one_position", "two_positions"])
def test_gpu_forward_takes_flushing_exp2(dk):
    # Interpret mode (the other tests) computes the online softmax with jnp.exp2; the GPU build of
    # both forward kernels (one position a program, and two at Dk = 192) with one fma and
    # ex2.approx.ftz, as inline PTX. Lowering for CUDA needs no GPU.
    from experiments.kernel_resources import capture_triton_modules

    assert tuning_for(dk, 128).fwd_queries == (2 if dk == 192 else 1)
    length = 300
    q = jnp.ones((1, length, 64, dk), jnp.bfloat16)
    k = jnp.ones((1, length, 4, dk), jnp.bfloat16)
    v = jnp.ones((1, length, 4, 128), jnp.bfloat16)
    indices = jnp.zeros((1, length, 4, 16), jnp.int32)

    def gpu_forward(q, k, v, indices):
        return selection.selected_attention(q, k, v, indices, block_size=64, scale=0.1)

    [(name, _, _, module)] = capture_triton_modules(gpu_forward, q, k, v, indices)
    assert name == "nsa_selected_fwd"
    assert "ex2.approx.ftz.f32" in module and "__nv_exp2f" not in module


def test_exp2_affine_shapes():
    from pallas_kernels.gpu.tiles import exp2_affine

    x, offset = jnp.arange(6.0).reshape(2, 3), jnp.array([1.0, 2.0])
    np.testing.assert_allclose(exp2_affine(x, 0.5, offset, flush=False), 2.0 ** (x * 0.5 - offset[:, None]))
    with pytest.raises(ValueError, match=r"offset \[rows\]"):
        exp2_affine(x, 0.5, jnp.ones(3), flush=False)
    with pytest.raises(ValueError, match=r"x \[rows, cols\]"):
        exp2_affine(jnp.ones(3), 0.5, jnp.ones(3), flush=False)
