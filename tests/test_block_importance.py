"""The Mosaic GPU block importance and the Triton top-n kernel (interpret mode on CPU).

Their pair is the GPU default of ``select_blocks`` for 16-bit, unsegmented, ``G = 16`` inputs
(``pallas_kernels/gpu/select_blocks.py``). Checked against the ``xla`` reference (spec,
"Selection scores (Eqs. 8-10)", Eq. 11) on fresh random inputs at lengths that are not multiples
of the program's positions or of a key tile, across key tiles (the Eq. 9 carry), with exact ties.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax.reference import selection as reference
from nsa_jax.reference.compressed import compression_probabilities
from nsa_jax.segments import compressed_token_starts, num_compressed_slots, segment_starts
from pallas_kernels.gpu import block_importance_mosaic as importance_kernel
from pallas_kernels.gpu import select_blocks, top_n

PAPER = dict(block_length=32, block_stride=16, selection_block_size=64)


def _inputs(seed: int, length: int, dk: int, dtype, kv_heads: int = 1):
    keys = jax.random.split(jax.random.key(seed), 2)
    slots = num_compressed_slots(length, PAPER["block_stride"])
    q = jax.random.normal(keys[0], (1, length, 16 * kv_heads, dk), jnp.float32).astype(dtype)
    k_cmp = jax.random.normal(keys[1], (1, slots, kv_heads, dk), jnp.float32).astype(dtype)
    _, lse = nsa_jax.compressed_attention(q, k_cmp, k_cmp, block_length=32, block_stride=16)
    return q, k_cmp, lse


def _reference_importance(q, k_cmp, lse, geometry: dict) -> np.ndarray:
    length = q.shape[1]
    starts = segment_starts(None, 1, length)
    token_starts = compressed_token_starts(
        starts,
        k_cmp.shape[1],
        block_length=geometry["block_length"],
        block_stride=geometry["block_stride"],
    )
    probs = compression_probabilities(
        q,
        lse,
        jnp.arange(length)[None],
        starts,
        token_starts,
        k_cmp,
        block_length=geometry["block_length"],
        scale=q.shape[-1] ** -0.5,
    )
    num_blocks = -(-length // geometry["selection_block_size"])
    return np.asarray(
        reference.block_importance(
            probs, starts, num_kv_heads=k_cmp.shape[2], num_blocks=num_blocks, **geometry
        )
    )


@pytest.mark.parametrize(
    ("length", "dk", "dtype", "tuning", "position_range", "narrowest"),
    [
        # P = 16. Room for 200 positions' 18 importances: chunks of 192 positions, picked by
        # top-n launches over ranges of 4, 8, 16 and 18 blocks cut at the chunks' edges. The
        # importances checked: positions 900-1099, a range starting off a program's 16 positions
        # and reaching a second key tile (the Eq. 9 carry).
        (1100, 64, jnp.bfloat16, importance_kernel.ImportanceTuning(max_importances=3600), (900, 1100), 4),
        (300, 128, jnp.float16, importance_kernel.ImportanceTuning(positions=8), None, 32),
        (300, 64, jnp.bfloat16, importance_kernel.ImportanceTuning(positions=8, overlap=True), None, 32),
    ],
    ids=["P16_chunks", "P8_f16", "P8_overlap"],
)
def test_importance_and_picks_equal_the_reference(length, dk, dtype, tuning, position_range, narrowest):
    # Two KV heads where one key tile suffices; one over two key tiles (the slowest case here).
    q, k_cmp, lse = _inputs(length + dk, length, dk, dtype, kv_heads=1 if length > 1024 else 2)
    first, stop = (0, length) if position_range is None else position_range
    ours = np.asarray(
        importance_kernel.block_importance(
            q,
            k_cmp,
            lse,
            **PAPER,
            scale=dk**-0.5,
            interpret=True,
            tuning=tuning,
            position_range=position_range,
        )
    )
    expected = _reference_importance(q, k_cmp, lse, PAPER)[:, first:stop, :, : -(-stop // 64)]
    assert ours.shape == expected.shape
    visible = np.arange(expected.shape[-1])[None, :] <= (np.arange(first, stop) // 64)[:, None]
    visible = np.broadcast_to(visible[None, :, None, :], expected.shape)
    np.testing.assert_allclose(ours[visible], expected[visible], rtol=2e-6, atol=1e-9)
    selection = dict(PAPER, num_selected=6, num_initial_blocks=1, num_local_blocks=2, scale=dk**-0.5)
    picks = importance_kernel.select_blocks(
        q,
        k_cmp,
        lse,
        **selection,
        interpret=True,
        tuning=tuning,
        top_n_tuning=top_n.TopNTuning(narrowest=narrowest),
    )
    xla = nsa_jax.select_blocks(q, k_cmp, lse, **selection, implementation="xla")
    np.testing.assert_array_equal(np.asarray(picks), np.asarray(xla))


def test_ranges_and_chunks():
    assert top_n.position_ranges(1100, 18, 64, narrowest=4) == [
        (0, 256, 4),
        (256, 512, 8),
        (512, 1024, 16),
        (1024, 1100, 18),
    ]
    assert top_n.position_ranges(65536, 1024, 64, narrowest=32)[-1] == (32768, 65536, 1024)
    default = importance_kernel.default_tuning(128)
    # The paper's heads at 64K: every position in one launch; at 256K, 16 launches.
    assert importance_kernel.chunk_positions(4 * 1024, default) == 65536
    assert importance_kernel.chunk_positions(4 * 4096, default) == 16384
    small = importance_kernel.ImportanceTuning(max_importances=3600)
    assert importance_kernel.chunk_positions(18, small) == 192
    assert importance_kernel.chunk_positions(10**6, small) == 16


def test_default_select_blocks_keeps_exact_ties_across_key_tiles():
    # Periodic compressed keys: every block with all five Eq. 9 terms ties exactly, within a key
    # tile and for the first block of the next one (its term from the tile before comes through
    # the carry); the lowest blocks must win, as in the reference. bf16, G = 16: the default
    # pallas_triton select_blocks takes the Mosaic scores and the top-n kernel here.
    length = 2100
    q, k_cmp, _ = _inputs(4, length, 64, jnp.bfloat16)
    k_cmp = jnp.tile(k_cmp[:, :4], (1, -(-k_cmp.shape[1] // 4), 1, 1))[:, : k_cmp.shape[1]]
    _, lse = nsa_jax.compressed_attention(q, k_cmp, k_cmp, block_length=32, block_stride=16)
    selection = dict(PAPER, num_selected=16, num_initial_blocks=1, num_local_blocks=2)
    ours = np.asarray(nsa_jax.select_blocks(q, k_cmp, lse, **selection, implementation="pallas_triton"))
    xla = np.asarray(nsa_jax.select_blocks(q, k_cmp, lse, **selection, implementation="xla"))
    np.testing.assert_array_equal(ours, xla)
    # t = 2099: block 32 holds t, 31 is local, 0 initial; blocks 1..13 win the ties.
    np.testing.assert_array_equal(ours[0, 2099, 0], [0, *range(1, 14), 31, 32])


@pytest.mark.parametrize("geometry", [(32, 16, 64), (64, 16, 64), (16, 16, 64), (16, 8, 16)], ids=str)
def test_eq9_weights_with_the_carry_give_the_reference_importance(geometry):
    # The kernel's Eq. 9: per key tile of 64 tokens, sums = g @ W; importance = own + back, block
    # 0's back term being the previous tile's column b (the carry). Against the reference on
    # random token probabilities over three tiles.
    l, d, lsel = geometry
    weights = importance_kernel.eq9_weights(l, d, lsel)
    blocks = 64 // (lsel // d)
    assert weights.shape == (64, 2 * blocks)
    length = 3 * 64 * d
    slots = length // d
    probs = jax.random.uniform(jax.random.key(sum(geometry)), (1, 1, 16, slots), jnp.float32)
    g = np.asarray(jnp.sum(probs, axis=2))[0, 0]
    carry = 0.0
    ours = []
    for tile in range(3):
        sums = g[tile * 64 : (tile + 1) * 64] @ weights
        back = sums[blocks:]
        ours.append(sums[:blocks] + np.concatenate([[carry], back[1:]]))
        carry = back[0]
    expected = reference.block_importance(
        probs,
        jnp.zeros((1, 1), jnp.int32),
        num_kv_heads=1,
        block_length=l,
        block_stride=d,
        selection_block_size=lsel,
        num_blocks=3 * blocks,
    )
    np.testing.assert_allclose(np.concatenate(ours), np.asarray(expected)[0, 0, 0], rtol=1e-6)


@pytest.mark.parametrize(
    ("length", "num_selected", "forced", "tuning"),
    [
        (300, 4, (1, 2), top_n.TopNTuning(4, 4, "lanes")),
        (2100, 16, (1, 2), top_n.TopNTuning(1, 1, "lanes")),
        (2100, 16, (1, 2), top_n.TopNTuning(8, 4, "flat")),
        (130, 6, (0, 1), top_n.TopNTuning(2, 1, "lanes")),
        (200, 2, (1, 2), top_n.TopNTuning()),  # n < forced blocks: rounds of arg-max
        (700, 5, (1, 2), top_n.TopNTuning(narrowest=2)),  # launches of 2, 4, 8 and 11 blocks
    ],
    ids=str,
)
def test_top_n_kernel_equals_the_reference_with_ties(length, num_selected, forced, tuning):
    num_blocks = -(-length // 64)
    importance = jax.random.uniform(jax.random.key(length + num_selected), (2, length, 3, num_blocks))
    importance = jnp.round(importance * 8) / 8  # many exact ties
    kwargs = dict(
        selection_block_size=64,
        num_selected=num_selected,
        num_initial_blocks=forced[0],
        num_local_blocks=forced[1],
    )
    ours = top_n.top_blocks(importance, **kwargs, interpret=True, tuning=tuning)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    expected = reference.top_blocks(importance, positions, jnp.zeros((2, length), jnp.int32), **kwargs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))


@pytest.mark.parametrize(
    ("dtype", "served"),
    [(jnp.bfloat16, {"nsa_block_importance", "nsa_top_n"}), (jnp.float32, {"nsa_select_blocks"})],
    ids=["bf16", "f32"],
)
def test_gpu_default_lowers_to_the_served_kernels(dtype, served, monkeypatch):
    # Lowered for an abstract H200 (no GPU here): 16-bit inputs take the Mosaic scores and the
    # top-n kernel, float32 the Triton scoring kernel.
    from experiments.kernel_resources import lower_for_h200

    monkeypatch.setattr(importance_kernel, "_on_hopper", lambda: True)

    def select(q, k_cmp, lse):
        return select_blocks.select_blocks(
            q, k_cmp, lse, **PAPER, num_selected=16, num_initial_blocks=1, num_local_blocks=2, scale=0.1
        )

    # T = 4100, not a multiple of a program's positions: q is padded for the TMA copies.
    shapes = [
        jax.ShapeDtypeStruct((1, 4100, 64, 192), dtype),
        jax.ShapeDtypeStruct((1, 256, 4, 192), dtype),
        jax.ShapeDtypeStruct((1, 4100, 64), jnp.float32),
    ]
    found = set(re.findall(r"nsa_[a-z_]+", lower_for_h200(select, *shapes)))
    unserved = {"nsa_block_importance", "nsa_top_n", "nsa_select_blocks"} - served
    assert served <= found and not unserved & found


def test_supports_and_rejects():
    served = dict(segmented=False, group=16, dk=192, dtype="bfloat16", **PAPER, interpret=True)
    assert importance_kernel.supports(**served)
    assert not importance_kernel.supports(**dict(served, segmented=True))
    assert not importance_kernel.supports(**dict(served, group=4))
    assert not importance_kernel.supports(**dict(served, dk=96))
    assert not importance_kernel.supports(**dict(served, dk=320))
    assert not importance_kernel.supports(**dict(served, dtype="float32"))
    assert not importance_kernel.supports(
        **dict(served, block_length=32, block_stride=8, selection_block_size=64)  # r = 8
    )
    assert not importance_kernel.supports(**dict(served, interpret=False))  # no Hopper GPU here
    with pytest.raises(ValueError, match="positions must be 8 or 16, got 4"):
        importance_kernel.ImportanceTuning(positions=4)
    with pytest.raises(ValueError, match="positions must be a power of two, got 3"):
        top_n.TopNTuning(positions=3)
    with pytest.raises(ValueError, match="narrowest must be a power of two, got 12"):
        top_n.TopNTuning(narrowest=12)
    with pytest.raises(ValueError, match="view must be 'lanes' or 'flat'"):
        top_n.TopNTuning(view="rows")
    q, k_cmp, lse = _inputs(1, 64, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="must share B and Dk"):
        importance_kernel.block_importance(q, k_cmp[..., :32], lse, **PAPER, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="position_range must satisfy"):
        importance_kernel.block_importance(
            q, k_cmp, lse, **PAPER, scale=1.0, interpret=True, position_range=(8, 8)
        )
    with pytest.raises(ValueError, match="max_importances must be positive, got 0"):
        importance_kernel.ImportanceTuning(max_importances=0)
    with pytest.raises(ValueError, match="importances_a_position must be positive, got 0"):
        importance_kernel.chunk_positions(0, importance_kernel.ImportanceTuning())
    picks = dict(selection_block_size=64, num_selected=4, num_initial_blocks=1, num_local_blocks=2)
    with pytest.raises(
        ValueError, match=r"positions first=60 .. stop=80 must be rows of importance, positions 0 .. 64"
    ):
        top_n.top_blocks_of_range(
            jnp.zeros((1, 64, 1, 2)), first=60, stop=80, blocks=2, rows_first=0, **picks, interpret=True,
            tuning=top_n.TopNTuning(),
        )  # fmt: skip
    with pytest.raises(ValueError, match="lse must be"):
        importance_kernel.block_importance(q, k_cmp, lse[:, :8], **PAPER, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="importance must be float32"):
        top_n.top_blocks(
            lse, selection_block_size=64, num_selected=4, num_initial_blocks=1, num_local_blocks=2
        )
    with pytest.raises(ValueError, match="16 query heads per KV head"):
        importance_kernel.block_importance(
            q[:, :, :8], k_cmp, lse[:, :, :8], **PAPER, scale=1.0, interpret=True
        )
