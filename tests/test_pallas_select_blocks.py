"""Kernel-specific tests of the pallas_triton block selection (interpret mode on CPU).

The shared oracle test lives in ``tests/test_selection.py``; these compare the kernel
with the ``xla`` reference on fresh random inputs over the (l, d, l') geometries, GQA
group sizes, packing (query tiles spanning segments), several key tiles (Eq. 9 terms carried
from one key tile to the next), ``l'/d`` not a power of two, the ``SelectTuning`` variants
(tiles, Eq. 9 layout, top-n method), and exact ties.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax.segments import num_compressed_slots


def _select_both(
    q, k_cmp, *, geometry, num_selected, segment_ids=None, num_initial_blocks=1, num_local_blocks=2
):
    """``(pallas_triton, xla)`` block indices for the same inputs, lse from the xla compression."""
    l, d, lsel = geometry
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    _, lse = nsa_jax.compressed_attention(q, k_cmp, k_cmp, block_length=l, block_stride=d, segment_ids=seg)
    kwargs = dict(
        block_length=l,
        block_stride=d,
        selection_block_size=lsel,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        segment_ids=seg,
    )
    ours = nsa_jax.select_blocks(q, k_cmp, lse, implementation="pallas_triton", **kwargs)
    reference = nsa_jax.select_blocks(q, k_cmp, lse, implementation="xla", **kwargs)
    return np.asarray(ours), np.asarray(reference)


def _random_inputs(seed, batch, length, q_heads, kv_heads, dk, block_stride, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 2)
    slots = num_compressed_slots(length, block_stride)
    q = jax.random.normal(keys[0], (batch, length, q_heads, dk), jnp.float32).astype(dtype)
    k_cmp = jax.random.normal(keys[1], (batch, slots, kv_heads, dk), jnp.float32).astype(dtype)
    return q, k_cmp


def _packed(batch: int, length: int, seed: int) -> np.ndarray:
    """int32 ``[B, T]``: row 0 a short segment then a long one (many blocks to rank after
    a nonzero segment start), the other rows three segments."""
    positions = np.arange(length)
    rows = [positions >= 5 + seed % 20]
    rows += [np.searchsorted([length // 3, 2 * length // 3 + 1], positions, side="right")] * (batch - 1)
    return np.asarray(rows, np.int32)


@pytest.mark.parametrize(
    ("geometry", "length", "num_selected", "forced", "group", "packed"),
    [
        ((32, 16, 64), 300, 4, (1, 2), 4, False),
        ((32, 16, 64), 300, 3, (1, 1), 1, True),
        ((16, 8, 16), 83, 4, (1, 2), 16, True),
        ((8, 8, 8), 77, 6, (1, 2), 1, False),
        ((64, 64, 64), 250, 3, (1, 1), 4, True),
        ((16, 4, 32), 150, 4, (1, 2), 16, False),
        # l'/d = 3 tokens per block (padded to 4 in a key tile), two key tiles, Eq. 9 carry, G = 3
        # (a padded head row in every position).
        ((8, 4, 12), 300, 5, (1, 2), 3, True),
        # l'/d = 16 tokens per block: one block per quarter of a key tile (quads).
        ((8, 4, 64), 300, 4, (1, 2), 4, False),
    ],
    ids=str,
)
def test_equals_xla_on_random_inputs(geometry, length, num_selected, forced, group, packed):
    batch, kv_heads, dk = 2, 2, 24
    seed = hash((geometry, length, group)) % 1000
    q, k_cmp = _random_inputs(seed, batch, length, kv_heads * group, kv_heads, dk, geometry[1])
    ours, reference = _select_both(
        q,
        k_cmp,
        geometry=geometry,
        num_selected=num_selected,
        num_initial_blocks=forced[0],
        num_local_blocks=forced[1],
        segment_ids=_packed(batch, length, seed) if packed else None,
    )
    np.testing.assert_array_equal(ours, reference)


def test_several_steps_of_blocks_and_other_forced_counts():
    # 300 / 8 = 38 selection blocks: two steps of 32 blocks; no initial block, so block 0
    # (which lacks its Eq. 9 term at offset -1) competes; fewer compressed tokens than
    # slots (Tc < ceil(T / d)).
    q, k_cmp = _random_inputs(5, 1, 300, 4, 1, 16, 4)
    ours, reference = _select_both(
        q, k_cmp[:, :70], geometry=(8, 4, 8), num_selected=7, num_initial_blocks=0, num_local_blocks=1
    )
    np.testing.assert_array_equal(ours, reference)


_TUNINGS = {
    "default": {},
    "masked_only": dict(unmasked=False),
    "rows32_keys16": dict(rows=32, keys=16),
    "rows32_warps2": dict(rows=32, warps=2),  # the bf16 default at Dk = 192 past T = 32K in session 7
    "back_dot": dict(back_dot=True),
    "back_dot_rows64": dict(back_dot=True, rows=64, warps=4),
    "first_kernel": dict(quads=False, top_n="argmax"),
    "by_token_flat": dict(quads=False),
    "lanes": dict(top_n="lanes"),
    "keys128_rows64": dict(keys=128, rows=64, warps=4),
    "back_dot_keys128_rows64": dict(back_dot=True, keys=128, rows=64, warps=4),  # bf16, Dk <= 128, T > 32K
    "rows256_state16k": dict(rows=256, warps=16, state=16384),
}


def _select_with_tuning(q, k_cmp, tuning: dict, num_selected: int, segment_ids=None, geometry=(32, 16, 64)):
    """``(kernel with the tuning overrides, xla)`` at ``geometry`` = (l, d, l'), lse by xla."""
    from pallas_kernels.gpu import select_blocks

    l, d, lsel = geometry
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    _, lse = nsa_jax.compressed_attention(q, k_cmp, k_cmp, block_length=l, block_stride=d, segment_ids=seg)
    kwargs = dict(
        block_length=l,
        block_stride=d,
        selection_block_size=lsel,
        num_selected=num_selected,
        num_initial_blocks=1,
        num_local_blocks=2,
        scale=q.shape[-1] ** -0.5,
        segment_ids=seg,
    )
    chosen = select_blocks.SelectTuning(**tuning)
    ours = select_blocks.select_blocks(q, k_cmp, lse, **kwargs, interpret=True, tuning=chosen)
    reference = nsa_jax.select_blocks(q, k_cmp, lse, implementation="xla", **kwargs)
    return np.asarray(ours), np.asarray(reference)


def test_default_tuning_by_dtype_and_head_dim():
    from pallas_kernels.gpu import select_blocks

    long_tiles = select_blocks.LONG_SMALL_DK_TUNING
    for dk in (64, 128):
        assert select_blocks.default_tuning(jnp.bfloat16, dk, 65536) == long_tiles
        assert select_blocks.default_tuning(jnp.bfloat16, dk, 32768) == select_blocks.DEFAULT_TUNING
    for dk in (192, 256):
        assert select_blocks.default_tuning(jnp.bfloat16, dk, 65536) == select_blocks.DEFAULT_TUNING
    assert select_blocks.DEFAULT_TUNING.back_dot and select_blocks.DEFAULT_TUNING.rows == 64
    assert long_tiles == dataclasses.replace(select_blocks.DEFAULT_TUNING, keys=128)
    assert not select_blocks.default_tuning(jnp.bfloat16, 320, 4096).back_dot
    assert select_blocks.default_tuning(jnp.float32, 192, 4096) == select_blocks.FLOAT32_TUNING


@pytest.mark.parametrize(
    ("geometry", "length"),
    [
        ((64, 16, 64), 700),  # three tokens of the block before feed each block (b' = 4)
        ((8, 4, 12), 500),  # r = 3 tokens a block, padded to 4 in the key tile
    ],
    ids=str,
)
def test_back_dot_other_geometries_equal_xla(geometry, length):
    q, k_cmp = _random_inputs(21, 1, length, 16, 1, 16, geometry[1])
    ours, reference = _select_with_tuning(
        q, k_cmp, dict(back_dot=True, rows=64, warps=4), 5, _packed(1, length, 3), geometry=geometry
    )
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("geometry", [(32, 16, 64), (16, 16, 32)], ids=["back_dot", "no_back_terms"])
def test_bf16_default_equals_xla(geometry):
    # The bf16 default takes back_dot; with l = d no block has back terms, and the
    # kernel runs without it rather than rejecting its own default.
    q, k_cmp = _random_inputs(17, 1, 400, 16, 1, 64, geometry[1], jnp.bfloat16)
    ours, reference = _select_both(
        q, k_cmp, geometry=geometry, num_selected=5, segment_ids=_packed(1, 400, 4)
    )
    np.testing.assert_array_equal(ours, reference)


def test_back_dot_rejects_what_it_cannot_tile():
    from pallas_kernels.gpu import select_blocks

    with pytest.raises(ValueError, match="back_dot needs quads"):
        select_blocks.SelectTuning(back_dot=True, quads=False)
    q, k_cmp = _random_inputs(3, 1, 200, 16, 1, 16, 16)
    # 16 keys of 4 tokens a block: 4 blocks a key tile, one back token each: 4 back-dot columns.
    with pytest.raises(ValueError, match="back-dot columns"):
        _select_with_tuning(q, k_cmp, dict(back_dot=True, keys=16), 4)


@pytest.mark.parametrize("tuning", list(_TUNINGS))
@pytest.mark.parametrize("length", [1100, 301])
def test_tilings_equal_xla(tuning, length):
    # The tests above run float32 with its own (smaller) tiles; these run the 16-bit tile shapes
    # on float32 inputs (8 positions of G = 16, 16 blocks a key tile), the first kernel's Eq. 9
    # and top-n, and other tiles: two to five key tiles (Eq. 9 carries), segments crossing query
    # tiles, 32 or 16 blocks (Nb') per position, 4 to 16 positions a tile.
    q, k_cmp = _random_inputs(12, 1, length, 16, 1, 16, 16)
    ours, reference = _select_with_tuning(q, k_cmp, _TUNINGS[tuning], 6, _packed(1, length, 12))
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize(
    "tuning", ["default", "lanes", "keys128_rows64", "rows256_state16k", "first_kernel", "back_dot"]
)
def test_tilings_keep_exact_ties(tuning):
    # Periodic compressed keys: every selection block sees the same Eq. 9 tokens, so the
    # importances of all blocks with all five terms tie exactly (across key tiles, quarters of a
    # tile and the Eq. 9 carry); the lowest blocks must win, as in the reference. bf16, G = 16.
    # Masked key tiles only: in interpret mode XLA compiles the masked and unmasked loop bodies
    # separately, and their float32 logits can differ in the last bit (the first kernel, with both
    # bodies, tied exactly on the H200).
    tuning = dict(_TUNINGS[tuning], unmasked=False)
    length = 2100
    q, k_cmp = _random_inputs(4, 1, length, 16, 1, 32, 16, jnp.bfloat16)
    k_cmp = jnp.tile(k_cmp[:, :4], (1, -(-k_cmp.shape[1] // 4), 1, 1))[:, : k_cmp.shape[1]]
    ours, reference = _select_with_tuning(q, k_cmp, tuning, 16)
    np.testing.assert_array_equal(ours, reference)
    # t = 2099: block 32 holds t, 31 is local, 0 initial; blocks 1..13 win the ties.
    np.testing.assert_array_equal(ours[0, 2099, 0], [0, *range(1, 14), 31, 32])


def test_bfloat16_equals_xla():
    q, k_cmp = _random_inputs(7, 1, 130, 8, 2, 32, 16, jnp.bfloat16)
    ours, reference = _select_both(q, k_cmp, geometry=(32, 16, 64), num_selected=3)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize(("geometry", "length"), [((8, 8, 16), 160), ((32, 16, 64), 400)], ids=str)
def test_ties_go_to_the_lower_block(geometry, length):
    # q = 0: every visible compressed token is equally likely, so interior blocks tie exactly.
    _, k_cmp = _random_inputs(3, 1, length, 2, 1, 16, geometry[1])
    q = jnp.zeros((1, length, 2, 16), jnp.float32)
    num_selected = 5 if geometry == (8, 8, 16) else 4
    ours, reference = _select_both(q, k_cmp, geometry=geometry, num_selected=num_selected)
    np.testing.assert_array_equal(ours, reference)
    if geometry == (8, 8, 16):
        # t = 159: block 9 holds t, 8 is local, 0 initial; ties among 1..7 pick 1 and 2.
        np.testing.assert_array_equal(ours[0, 159, 0], [0, 1, 2, 8, 9])
        # t = 20: only blocks 0 and 1 are visible, the rest is padding.
        np.testing.assert_array_equal(ours[0, 20, 0], [0, 1, -1, -1, -1])
    else:
        # t = 399: blocks 1..4 have all five Eq. 9 terms and tie; block 1 wins.
        np.testing.assert_array_equal(ours[0, 399, 0], [0, 1, 5, 6])


@pytest.mark.parametrize(
    ("geometry", "back"), [((32, 16, 64), False), ((32, 16, 64), True), ((8, 4, 12), True)]
)
def test_tiled_keys_hold_each_columns_token(geometry, back):
    # Unsegmented rows load key tiles as consecutive rows of _tiled_keys: row t * width + c must
    # be the key of the token column c of tile t holds, and zero where it holds none (padding
    # columns, back tokens before token 0, tokens past the last).
    from pallas_kernels.gpu import select_blocks

    l, d, lsel = geometry
    _, k_cmp = _random_inputs(5, 2, 700, 4, 3, 24, d)
    geo = select_blocks._Geometry(
        length=700,
        slots=k_cmp.shape[1],
        group=4,
        dk=24,
        block_length=l,
        block_stride=d,
        selection_block_size=lsel,
        num_selected=5,
        num_initial_blocks=1,
        num_local_blocks=2,
        scale=1.0,
        segmented=False,
        dtype="float32",
        tuning=select_blocks.SelectTuning(rows=64, warps=4),
    )
    columns = select_blocks._back_columns if back else select_blocks._key_columns
    tiled = np.asarray(select_blocks._tiled_keys(k_cmp, geo, columns))
    offsets, used = (np.asarray(x) for x in columns(geo))
    width = offsets.shape[0]
    assert tiled.shape == (2, geo.steps * width, 3, 24)
    keys = np.asarray(k_cmp)
    for tile in range(geo.steps):
        for column in range(width):
            token = tile * geo.tile_blocks * geo.ratio + offsets[column]
            holds = used[column] and 0 <= token < geo.slots
            expected = keys[:, token] if holds else np.zeros_like(keys[:, 0])
            np.testing.assert_array_equal(tiled[:, tile * width + column], expected)


def test_carries_no_gradient():
    q, k_cmp = _random_inputs(2, 1, 40, 2, 1, 8, 4)
    lse = jnp.zeros((1, 40, 2))

    def total(q, k_cmp):
        chosen = nsa_jax.select_blocks(
            q,
            k_cmp,
            lse,
            block_length=8,
            block_stride=4,
            selection_block_size=8,
            num_selected=3,
            implementation="pallas_triton",
        )
        return jnp.sum(chosen.astype(jnp.float32))

    for grad in jax.grad(total, argnums=(0, 1))(q, k_cmp):
        assert not np.any(np.asarray(grad))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("tuning", [None, {"back_dot": True}], ids=["default", "back_dot"])
def test_kernel_lowers_to_triton_ir(monkeypatch, tuning):
    # Cross-platform export runs the Pallas Triton lowering (kernel to Triton IR) without a
    # GPU once the lowering is told which GPU to target (private API, hence the guard);
    # Triton's own compilation to PTX happens on a GPU only.
    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration
    except ImportError:
        pytest.skip("this jax has no Pallas Triton lowering module")
    if not hasattr(gpu_info, "_get_gpu_info_impl"):
        pytest.skip("this jax names its GPU info differently")
    h200 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H200)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h200)
    from pallas_kernels.gpu import select_blocks

    batch, length, q_heads, kv_heads, dk = 1, 1024, 64, 4, 192
    q = jnp.zeros((batch, length, q_heads, dk), jnp.bfloat16)
    k_cmp = jnp.zeros((batch, length // 16, kv_heads, dk), jnp.bfloat16)
    lse = jnp.zeros((batch, length, q_heads), jnp.float32)
    segment_ids = jnp.zeros((batch, length), jnp.int32)
    select = lambda q, k_cmp, lse: select_blocks.select_blocks(
        q,
        k_cmp,
        lse,
        block_length=32,
        block_stride=16,
        selection_block_size=64,
        num_selected=16,
        num_initial_blocks=1,
        num_local_blocks=2,
        scale=0.1,
        segment_ids=segment_ids,
        tuning=None if tuning is None else select_blocks.SelectTuning(**tuning),
    )
    triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = jax.export.export(jax.jit(select), platforms=["cuda"], disabled_checks=[triton_call])(
        q, k_cmp, lse
    )
    module = exported.mlir_module()
    assert module.count("__gpu$xla.gpu.triton") == 1 and "nsa_select_blocks" in module


def test_gpu_build_takes_flushing_exp2():
    # Interpret mode (every other test here) computes jnp.exp2(x * scale - lse); the GPU build
    # computes it with one fma and ex2.approx.ftz, as inline PTX. Lowering for CUDA needs no GPU.
    from experiments.kernel_resources import capture_triton_modules
    from pallas_kernels.gpu import select_blocks

    q, k_cmp = _random_inputs(4, 1, 300, 16, 1, 32, 16, jnp.bfloat16)
    lse = jnp.zeros(q.shape[:3], jnp.float32)

    def gpu_select(q, k_cmp, lse):
        return select_blocks.select_blocks(
            q,
            k_cmp,
            lse,
            block_length=32,
            block_stride=16,
            selection_block_size=64,
            num_selected=4,
            num_initial_blocks=1,
            num_local_blocks=2,
            scale=0.2,
        )

    [(name, _, _, module)] = capture_triton_modules(gpu_select, q, k_cmp, lse)
    assert name == "nsa_select_blocks"
    assert "fma.rn.f32" in module and "ex2.approx.ftz.f32" in module
    assert "__nv_exp2f" not in module
