"""Block selection (spec, Eqs. 9-11) against brute-force counting and ranking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax.segments import num_compressed_slots
from tests import oracle
from tests.conftest import Inputs, packed_segment_ids


def brute_force_weights(block_length, block_stride, selection_block_size, num_tokens, num_blocks):
    """``W[i, j]`` = raw tokens shared by compressed token i and selection block j, over d."""
    weights = np.zeros((num_tokens, num_blocks))
    for i in range(num_tokens):
        token = set(range(i * block_stride, i * block_stride + block_length))
        for j in range(num_blocks):
            block = set(range(j * selection_block_size, (j + 1) * selection_block_size))
            weights[i, j] = len(token & block) / block_stride
    return weights


@pytest.mark.parametrize(
    "geometry", [(32, 16, 64), (64, 64, 64), (16, 4, 32), (8, 8, 32), (24, 8, 24), (32, 16, 32)]
)
def test_overlap_weights_equal_token_overlap_count(geometry):
    block_length, block_stride, selection_block_size = geometry
    first, weights = nsa_jax.overlap_weights(*geometry)
    num_tokens, num_blocks = 40, 8
    brute = brute_force_weights(block_length, block_stride, selection_block_size, num_tokens, num_blocks)
    ours = np.zeros_like(brute)
    for j in range(num_blocks):
        for k, weight in enumerate(weights):
            i = j * selection_block_size // block_stride + first + k
            if 0 <= i < num_tokens:
                ours[i, j] = weight
    np.testing.assert_array_equal(ours, brute)


def test_paper_weights_are_1_2_2_2_1():
    assert nsa_jax.overlap_weights(32, 16, 64) == (-1, (1, 2, 2, 2, 1))
    assert nsa_jax.overlap_weights(64, 64, 64) == (0, (1,))  # l = l' = d: p_slc = p_cmp


def brute_force_selection(probs, num_kv_heads, l, d, lsel, n, num_initial, num_local, segment_ids):
    """Eqs. 9-11 by loops: per query, score every visible block, then rank."""
    batch, length, q_heads, num_slots = probs.shape
    group = q_heads // num_kv_heads
    rows = oracle.segments_of(segment_ids, batch, length)
    slots = oracle.compressed_slots(batch, length, l, d, segment_ids)
    out = np.full((batch, length, num_kv_heads, n), -1, np.int64)
    for b in range(batch):
        for t in range(length):
            s0 = oracle.segment_start_of(rows[b], t)
            current = (t - s0) // lsel
            for h in range(num_kv_heads):
                scores = {}
                for j in range(current + 1):
                    block = set(range(s0 + j * lsel, s0 + (j + 1) * lsel))
                    total = 0.0
                    for c, (first, seg_start) in slots[b].items():
                        if seg_start == s0 and c < num_slots:
                            overlap = len(block & set(range(first, first + l))) / d
                            total += overlap * probs[b, t, h * group : (h + 1) * group, c].sum()
                    scores[j] = total
                forced = {j for j in scores if j < num_initial or j > current - num_local}
                rest = sorted((j for j in scores if j not in forced), key=lambda j: (-scores[j], j))
                chosen = sorted(forced | set(rest[: n - len(forced)]))
                out[b, t, h, : len(chosen)] = chosen
    return out


def random_probabilities(seed, batch, length, q_heads, num_slots, mask):
    logits = np.random.default_rng(seed).normal(size=(batch, length, q_heads, num_slots))
    logits = np.where(mask, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = np.nan_to_num(probs / probs.sum(-1, keepdims=True))
    return probs.astype(np.float32)


@pytest.mark.parametrize(
    ("geometry", "num_selected", "group"),
    [((8, 4, 16), 4, 1), ((8, 4, 8), 5, 2), ((16, 8, 16), 3, 4), ((8, 8, 8), 6, 16)],
    ids=str,
)
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_select_blocks_from_probabilities_matches_brute_force(geometry, num_selected, group, packed):
    l, d, lsel = geometry
    batch, length, kv_heads = 2, 83, 2
    q_heads = kv_heads * group
    seed = hash((geometry, packed)) % 1000
    segment_ids = packed_segment_ids(batch, length, seed) if packed else None
    slots = num_compressed_slots(length, d)
    mask = np.repeat(oracle.compressed_mask(length, slots, kv_heads, l, d, batch, segment_ids), group, axis=2)
    probs = random_probabilities(seed, batch, length, q_heads, slots, mask)
    ours = nsa_jax.select_blocks_from_probabilities(
        jnp.asarray(probs),
        num_kv_heads=kv_heads,
        block_length=l,
        block_stride=d,
        selection_block_size=lsel,
        num_selected=num_selected,
        segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
    )
    brute = brute_force_selection(probs, kv_heads, l, d, lsel, num_selected, 1, 2, segment_ids)
    np.testing.assert_array_equal(np.asarray(ours), brute)


def test_ties_break_toward_the_lower_block():
    # Uniform probabilities over visible tokens: interior blocks tie exactly.
    batch, length, l, d, lsel, n = 1, 160, 8, 8, 16, 5
    slots = num_compressed_slots(length, d)
    mask = oracle.compressed_mask(length, slots, 1, l, d, batch)
    probs = np.where(mask, 1.0 / np.maximum(mask.sum(-1, keepdims=True), 1), 0.0).astype(np.float32)
    ours = np.asarray(
        nsa_jax.select_blocks_from_probabilities(
            jnp.asarray(probs),
            num_kv_heads=1,
            block_length=l,
            block_stride=d,
            selection_block_size=lsel,
            num_selected=n,
        )
    )
    # At t = 159: block 9 holds t, 8 is local, 0 initial; ties among 1..7 pick 1 and 2.
    np.testing.assert_array_equal(ours[0, 159, 0], [0, 1, 2, 8, 9])
    # At t = 20 only blocks 0 and 1 are visible: the rest is padding.
    np.testing.assert_array_equal(ours[0, 20, 0], [0, 1, -1, -1, -1])


@pytest.mark.parametrize("implementation", nsa_jax.implementations("select_blocks"))
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_select_blocks_op_equals_selection_on_oracle_probabilities(implementation, packed):
    batch, length, q_heads, kv_heads, dk, l, d, lsel, n = 2, 90, 8, 2, 16, 8, 4, 16, 4
    inputs = Inputs(21, batch, length, q_heads, kv_heads, dk, 8, jnp.float32)
    slots = num_compressed_slots(length, d)
    k_cmp = jax.random.normal(jax.random.key(4), (batch, slots, kv_heads, dk))
    segment_ids = packed_segment_ids(batch, length, 21) if packed else None
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    geometry = dict(block_length=l, block_stride=d)
    _, lse = nsa_jax.compressed_attention(inputs.q, k_cmp, k_cmp[..., :8], segment_ids=seg, **geometry)
    ours = nsa_jax.select_blocks(
        inputs.q,
        k_cmp,
        lse,
        selection_block_size=lsel,
        num_selected=n,
        segment_ids=seg,
        implementation=implementation,
        **geometry,
    )
    mask = oracle.compressed_mask(length, slots, kv_heads, l, d, batch, segment_ids)
    _, probs = oracle.dense_attention(inputs.q, k_cmp, k_cmp, mask)
    brute = brute_force_selection(np.asarray(probs), kv_heads, l, d, lsel, n, 1, 2, segment_ids)
    np.testing.assert_array_equal(np.asarray(ours), brute)


def test_bad_selection_arguments_raise():
    inputs = Inputs(0, 1, 32, 4, 2, 8, 8, jnp.float32)
    k_cmp = inputs.k[:, :8]
    lse = jnp.zeros((1, 32, 4))
    call = lambda **kw: nsa_jax.select_blocks(
        inputs.q,
        k_cmp,
        kw.pop("lse", lse),
        **{**dict(block_length=8, block_stride=4, selection_block_size=16, num_selected=4), **kw},
    )
    with pytest.raises(ValueError, match="num_selected must be at least"):
        call(num_selected=2)
    with pytest.raises(ValueError, match=r"block_stride must divide selection_block_size"):
        call(selection_block_size=18)
    with pytest.raises(ValueError, match=r"block_length must not exceed selection_block_size"):
        call(block_length=32, selection_block_size=16)
    with pytest.raises(ValueError, match="lse must have shape"):
        call(lse=jnp.zeros((1, 32, 2)))
    with pytest.raises(ValueError, match="num_initial_blocks must be a non-negative int"):
        call(num_initial_blocks=-1)
