"""Decoding (spec, "Decoding"): cached steps reproduce the full-sequence forward."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from experiments.model import ModelConfig, TransformerLM
from nsa_jax.decoding import CACHE_LOGICAL_AXES, decode_step_at, generate, selected_and_window_at
from tests.test_layer import SMALL

# Jitted: compiling a layer or model once is far cheaper than dispatching it op by op.
_full_forward = nnx.jit(lambda module, x: module(x))


def _decode_all(layer, x, prompt_lengths, steps):
    """Prefills ``x[:, :max(prompt_lengths)]`` then feeds row b's tokens from its own length on."""
    batch = x.shape[0]
    prompt = int(max(prompt_lengths))
    cache = layer.init_cache(batch, prompt + steps)
    _, cache = nnx.jit(lambda m, x, n, c: m.prefill(x, n, c))(
        layer, x[:, :prompt], jnp.asarray(prompt_lengths), cache
    )
    step = nnx.jit(lambda m, x, c: m.decode(x, c))
    rows = np.arange(batch)
    outs = []
    for k in range(steps):
        y, cache = step(layer, x[rows, np.asarray(prompt_lengths) + k], cache)
        outs.append(y)
    return jnp.stack(outs, axis=1), cache


@pytest.mark.parametrize("compression", ["mlp", "mean"])
def test_token_by_token_equals_full_forward(compression):
    config = dataclasses.replace(SMALL, compression=compression)
    layer = nsa_jax.NativeSparseAttention(config, rngs=nnx.Rngs(0))
    length, prompt = 61, 11  # neither a multiple of l=8, d=4 nor l'=16
    x = jax.random.normal(jax.random.key(1), (2, length, config.model_dim))
    full = _full_forward(layer, x)
    decoded, cache = _decode_all(layer, x, [prompt, prompt], length - prompt)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full[:, prompt:]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [length, length])
    # Steps right after a compressed block completes ((t + 1 - l) % d == 0) are among those checked,
    # and every complete block has been compressed into its slot.
    completed = [t for t in range(prompt, length) if (t + 1 - config.block_length) % config.block_stride == 0]
    assert completed
    complete_slots = (length - config.block_length) // config.block_stride + 1
    assert bool(jnp.all(jnp.any(cache.k_cmp[:, :complete_slots] != 0, axis=(-1, -2))))


def test_token_by_token_through_the_decode_kernels_equals_full_forward(monkeypatch):
    # The layer's decode steps through the pallas_triton kernels of the whole step (Pallas interpret
    # mode off the GPU), ragged rows, against the full forward (XLA reference branches).
    import nsa_jax.layer

    step = functools.partial(nsa_jax.layer.decode_attention, implementation="pallas_triton")
    monkeypatch.setattr(nsa_jax.layer, "decode_attention", step)
    layer = nsa_jax.NativeSparseAttention(SMALL, rngs=nnx.Rngs(4))
    length, steps = 61, 40
    x = jax.random.normal(jax.random.key(6), (2, length, SMALL.model_dim))
    lengths = [11, 21]
    decoded, _ = _decode_all(layer, x, lengths, steps)
    full = _full_forward(layer, x)
    for row, start in enumerate(lengths):
        np.testing.assert_allclose(
            np.asarray(decoded[row]), np.asarray(full[row, start : start + steps]), rtol=1e-5, atol=1e-5
        )


def test_ragged_batch_decodes_each_row_on_its_own():
    layer = nsa_jax.NativeSparseAttention(SMALL, rngs=nnx.Rngs(2))
    length, steps = 45, 20
    x = jax.random.normal(jax.random.key(3), (3, length, SMALL.model_dim))
    lengths = [7, 17, 24]
    decoded, _ = _decode_all(layer, x, lengths, steps)
    full = _full_forward(layer, x)
    for row, start in enumerate(lengths):
        np.testing.assert_allclose(
            np.asarray(decoded[row]), np.asarray(full[row, start : start + steps]), rtol=1e-5, atol=1e-5
        )


def test_cache_is_a_pytree_with_logical_axes():
    layer = nsa_jax.NativeSparseAttention(SMALL, rngs=nnx.Rngs(0))
    cache = layer.init_cache(2, 50)
    leaves = jax.tree.leaves(cache)
    assert len(leaves) == 5
    assert cache.keys.shape == (3, 2, 50, SMALL.num_kv_heads, SMALL.head_dim_qk)
    assert cache.k_cmp.shape == (2, 13, SMALL.num_kv_heads, SMALL.head_dim_qk)
    for name, axes in CACHE_LOGICAL_AXES.items():
        assert len(axes) == getattr(cache, name).ndim, name
    moved = jax.tree.map(lambda a: a + 0, cache)
    assert type(moved) is type(cache)


def _tiny_lm():
    return TransformerLM(ModelConfig(num_layers=2), rngs=nnx.Rngs(0))


def test_greedy_generate_equals_recomputing_the_whole_sequence():
    model = _tiny_lm()
    prompt = jax.random.randint(jax.random.key(5), (2, 12), 0, 256)
    lengths = jnp.array([12, 9])
    new = 10
    generated = generate(model, prompt, lengths, max_new_tokens=new)
    assert generated.shape == (2, new) and generated.dtype == jnp.int32
    # One padded length for every recomputation (one compile): the model is causal, so the
    # zeros after position n - 1 do not change its logits there.
    padded = prompt.shape[1] + new
    for row in range(2):
        start = int(lengths[row])
        sequence = np.zeros(padded, np.int32)
        sequence[:start] = np.asarray(prompt[row, :start])
        for n in range(start, start + new):
            logits = _full_forward(model, jnp.asarray(sequence[None]))
            sequence[n] = int(jnp.argmax(logits[0, n - 1]))
        np.testing.assert_array_equal(np.asarray(generated[row]), sequence[start : start + new])


def test_sampling_is_reproducible_and_checked():
    model = _tiny_lm()
    prompt = jnp.zeros((1, 4), jnp.int32)
    a = generate(model, prompt, jnp.array([4]), max_new_tokens=5, temperature=1.0, rng=jax.random.key(0))
    b = generate(model, prompt, jnp.array([4]), max_new_tokens=5, temperature=1.0, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="rng must be given"):
        generate(model, prompt, jnp.array([4]), max_new_tokens=5, temperature=1.0)
    with pytest.raises(ValueError, match="prompt_lengths must have shape"):
        generate(model, prompt, jnp.array([4, 4]), max_new_tokens=5)
    full = TransformerLM(ModelConfig(attention="full"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="decoding needs attention='nsa'"):
        generate(full, prompt, jnp.array([4]), max_new_tokens=2)


@pytest.mark.parametrize("implementation", nsa_jax.implementations("decode_selected_window"))
@pytest.mark.parametrize(("group", "dk", "dv"), [(1, 16, 16), (4, 24, 16), (16, 32, 8)], ids=str)
def test_decode_reads_match_the_oracle(implementation, group, dk, dv, dtype):
    from nsa_jax import registry
    from tests import oracle
    from tests.conftest import TOLERANCE

    batch, kv_heads, capacity, block_size, slots, window = 3, 2, 150, 16, 4, 40
    keys = jax.random.split(jax.random.key(group), 3)
    q = jax.random.normal(keys[0], (batch, kv_heads * group, dk)).astype(dtype)
    k = jax.random.normal(keys[1], (3, batch, capacity, kv_heads, dk)).astype(dtype)
    v = jax.random.normal(keys[2], (3, batch, capacity, kv_heads, dv)).astype(dtype)
    lengths = np.array([150, 37, 5])
    rng = np.random.default_rng(group)
    indices = np.full((batch, kv_heads, slots), -1, np.int32)
    selected_mask = np.zeros((batch, 1, kv_heads, capacity), bool)
    window_mask = np.zeros((batch, 1, kv_heads, capacity), bool)
    for b in range(batch):
        position = lengths[b] - 1
        window_mask[b, 0, :, max(0, position - window + 1) : position + 1] = True
        for h in range(kv_heads):
            chosen = rng.permutation(position // block_size + 1)[: rng.integers(1, slots + 1)]
            indices[b, h, rng.permutation(slots)[: len(chosen)]] = chosen
            for j in chosen:
                selected_mask[b, 0, h, j * block_size : min(position + 1, (j + 1) * block_size)] = True
    args = (q, jnp.asarray(indices), k, v, jnp.asarray(lengths, jnp.int32))
    kwargs = dict(block_size=block_size, window=window, scale=dk**-0.5)
    selected, windowed = registry.resolve("decode_selected_window", implementation, *args, **kwargs)(
        *args, **kwargs
    )
    ref_selected = oracle.dense_attention(q[:, None], k[1], v[1], selected_mask)[0][:, 0]
    ref_window = oracle.dense_attention(q[:, None], k[2], v[2], window_mask)[0][:, 0]
    assert selected.dtype == dtype
    assert oracle.relative_error(selected, ref_selected) < TOLERANCE[dtype]
    assert oracle.relative_error(windowed, ref_window) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "launch", [(4, 2, 18, 2), (4, 2, 1, 1), (4, 2, 396, 1)], ids=["two_per_step", "one_per_branch", "many"]
)
def test_decode_reads_under_other_launches_equal_xla(launch, dtype):
    # Over 3 x 2 rows: target 18 programs, 2 items per step gives 4 items per program in 2
    # steps, the second selected program holding 1 block and 3 empty items; target 1 gives one
    # program per branch (the last one merges a single partial per branch); target 396 gives
    # one item per program, 5 selected and 4 window partials merged by the last program.
    from pallas_kernels.gpu import decode
    from tests import oracle
    from tests.conftest import TOLERANCE

    batch, kv_heads, group, capacity, block_size, window = 3, 2, 4, 150, 16, 40
    keys = jax.random.split(jax.random.key(31), 4)
    q = jax.random.normal(keys[0], (batch, kv_heads * group, 24)).astype(dtype)
    k = jax.random.normal(keys[1], (3, batch, capacity, kv_heads, 24)).astype(dtype)
    v = jax.random.normal(keys[2], (3, batch, capacity, kv_heads, 16)).astype(dtype)
    lengths = jnp.asarray([150, 37, 5], jnp.int32)
    # Blocks past the query (e.g. 9 at length 37) and unused slots (-1) must count for nothing.
    indices = jax.random.randint(keys[3], (batch, kv_heads, 5), -1, 10, jnp.int32)
    kwargs = dict(block_size=block_size, window=window, scale=24**-0.5)
    out = decode.selected_and_window(q, indices, k, v, lengths, **kwargs, launch=launch, interpret=True)
    ref = selected_and_window_at(q, indices, k, v, lengths, **kwargs)
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == dtype and o.shape == r.shape
        assert oracle.relative_error(o, r) < TOLERANCE[dtype]


# Small decode geometry: l=8, d=4, l'=16, n=5; capacity 300 (75 compressed slots: not a
# multiple of d, l' or the kernel's tile, and more than one chunk of it). Lengths: a full
# row, one right after a compressed block completes ((t + 1 - l) % d == 0 at t = 163),
# one before any compressed token exists.
_STEP = dict(block_length=8, block_stride=4, selection_block_size=16, num_selected=5)
_CAPACITY = 300
_LENGTHS = (300, 164, 5)


def _step_inputs(seed, group, dk, dv, dtype, kv_heads=2):
    """``q [B, HQ, Dk]``, ``k_cmp``/``v_cmp [B, Tc, H, D]`` and lengths ``[B]`` of ``_LENGTHS``."""
    keys = jax.random.split(jax.random.key(seed), 3)
    batch, slots = len(_LENGTHS), -(-_CAPACITY // _STEP["block_stride"])
    q = jax.random.normal(keys[0], (batch, kv_heads * group, dk)).astype(dtype)
    k_cmp = jax.random.normal(keys[1], (batch, slots, kv_heads, dk)).astype(dtype)
    v_cmp = jax.random.normal(keys[2], (batch, slots, kv_heads, dv)).astype(dtype)
    return q, k_cmp, v_cmp, jnp.asarray(_LENGTHS, jnp.int32)


def _compressed_selection(implementation, q, k_cmp, v_cmp, lengths, **overrides):
    from nsa_jax import registry

    args = (q, k_cmp, v_cmp, lengths)
    kwargs = dict(_STEP, num_initial_blocks=1, num_local_blocks=2, scale=q.shape[-1] ** -0.5)
    kwargs.update(overrides)
    out, indices = registry.resolve("decode_compressed_selection", implementation, *args, **kwargs)(
        *args, **kwargs
    )
    return out, np.asarray(indices)


@pytest.mark.parametrize("implementation", nsa_jax.implementations("decode_compressed_selection"))
@pytest.mark.parametrize(("group", "dk", "dv"), [(4, 24, 16), (16, 40, 8)], ids=str)
def test_compressed_and_selection_equal_the_xla_step(implementation, group, dk, dv, dtype):
    from tests import oracle
    from tests.conftest import TOLERANCE

    q, k_cmp, v_cmp, lengths = _step_inputs(group + dk, group, dk, dv, dtype)
    out, indices = _compressed_selection(implementation, q, k_cmp, v_cmp, lengths)
    ref_out, ref_indices = _compressed_selection("xla", q, k_cmp, v_cmp, lengths)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert oracle.relative_error(out, ref_out) < TOLERANCE[dtype]
    np.testing.assert_array_equal(indices, ref_indices)
    # The row before any compressed token: zero output, only the forced initial block.
    assert not np.any(np.asarray(out[2], np.float32))
    np.testing.assert_array_equal(indices[2], [[0, -1, -1, -1, -1]] * 2)


def _whole_step_picks(q, k_cmp, v_cmp, lengths, **overrides):
    """The block indices :func:`pallas_kernels.gpu.decode_step.whole_step` reads (Pallas interpret
    mode), on random raw keys and values (the picks do not depend on them)."""
    from pallas_kernels.gpu import decode_step

    batch, _, kv_heads, dk = k_cmp.shape
    capacity = max(int(jnp.max(lengths)), _CAPACITY)
    keys = jax.random.split(jax.random.key(7), 2)
    raw_k = jax.random.normal(keys[0], (3, batch, capacity, kv_heads, dk), q.dtype)
    raw_v = jax.random.normal(keys[1], (3, batch, capacity, kv_heads, v_cmp.shape[-1]), q.dtype)
    kwargs = dict(_STEP, num_initial_blocks=1, num_local_blocks=2, scale=q.shape[-1] ** -0.5, window=40)
    kwargs.update(overrides)
    *_, picks = decode_step.whole_step(
        q, raw_k, raw_v, k_cmp, v_cmp, lengths, **kwargs, interpret=True, return_picks=True
    )
    return np.asarray(picks)


@pytest.mark.parametrize(
    "implementation", [*nsa_jax.implementations("decode_compressed_selection"), "whole_step"]
)
@pytest.mark.parametrize("tie", ["zero_query", "repeated_keys"])
def test_selection_ties_go_to_the_lower_block(implementation, tie):
    q, k_cmp, v_cmp, lengths = _step_inputs(9, 4, 16, 16, jnp.float32, kv_heads=1)
    if tie == "zero_query":
        # Every visible compressed token equally likely: interior blocks tie exactly.
        q = jnp.zeros_like(q)
    else:
        # Keys repeating every 4 selection blocks (16 slots): blocks j and j + 4 tie, also
        # across the kernel's chunks of compressed tokens.
        k_cmp = jnp.tile(k_cmp[:, :16], (1, -(-k_cmp.shape[1] // 16), 1, 1))[:, : k_cmp.shape[1]]
    if implementation == "whole_step":
        indices = _whole_step_picks(q, k_cmp, v_cmp, lengths, num_local_blocks=1)
    else:
        indices = _compressed_selection(implementation, q, k_cmp, v_cmp, lengths, num_local_blocks=1)[1]
    reference = _compressed_selection("xla", q, k_cmp, v_cmp, lengths, num_local_blocks=1)[1]
    np.testing.assert_array_equal(indices, reference)
    if tie == "zero_query":
        # t = 299: block 18 holds t (local), 0 initial; blocks 1..17 have all their Eq. 9
        # terms and tie, so 1, 2 and 3 win.
        np.testing.assert_array_equal(indices[0, 0], [0, 1, 2, 3, 18])


@pytest.mark.parametrize("implementation", nsa_jax.implementations("decode_step"))
def test_decode_attention_equals_the_xla_step(implementation):
    from nsa_jax.decoding import NSACache, decode_attention
    from tests import oracle

    q, k_cmp, v_cmp, lengths = _step_inputs(4, 4, 24, 16, jnp.float32)
    keys = jax.random.split(jax.random.key(11), 2)
    cache = NSACache(
        keys=jax.random.normal(keys[0], (3, len(_LENGTHS), _CAPACITY, 2, 24)),
        values=jax.random.normal(keys[1], (3, len(_LENGTHS), _CAPACITY, 2, 16)),
        k_cmp=k_cmp,
        v_cmp=v_cmp,
        lengths=lengths,
    )
    step = lambda impl: decode_attention(q, cache, **_STEP, window=40, implementation=impl)
    for out, ref in zip(step(implementation), step("xla"), strict=True):
        assert oracle.relative_error(out, ref) < 1e-5


@pytest.mark.parametrize(
    ("select_launch", "num_selected"),
    [((4, 1), 40), ((8, 4), 12), ((4, 264), 12)],
    ids=["two", "four", "many"],
)
def test_compressed_kernels_with_many_chunks_and_parts_equal_xla(select_launch, num_selected):
    # l = d = l' = 4 over 300 compressed tokens: 300 selection blocks (512 padded). Kernel 2
    # splits them into 2 parts of 256 blocks (at most 256 a part; 40 picks: 64 candidates a
    # part), 4 parts of 128 or 8 parts of 64 (12 picks: 16 candidates a part; at most 128
    # candidates a row), those past the query's block (299) scoring nothing. A 16-token tile
    # splits the tokens over 32 chunks; their partials are merged 16 of Dv = 48 (64 padded)
    # columns at a time: 2 slices in each of 2 parts, or one slice in each of the first 4 parts.
    from pallas_kernels.gpu import decode_step
    from tests import oracle

    keys = jax.random.split(jax.random.key(21), 3)
    q = jax.random.normal(keys[0], (1, 4, 16))
    k_cmp = jax.random.normal(keys[1], (1, 300, 1, 16))
    v_cmp = jax.random.normal(keys[2], (1, 300, 1, 48))
    lengths = jnp.asarray([1197], jnp.int32)
    geometry = dict(block_length=4, block_stride=4, selection_block_size=4, num_selected=num_selected)
    kwargs = dict(geometry, num_initial_blocks=1, num_local_blocks=2, scale=0.25)
    out, indices = decode_step.compressed_and_selection(
        q,
        k_cmp,
        v_cmp,
        lengths,
        **kwargs,
        launch=(16, 4, 2, 264),
        select_launch=select_launch,
        interpret=True,
    )
    ref_out, ref_indices = _compressed_selection("xla", q, k_cmp, v_cmp, lengths, **geometry)
    assert oracle.relative_error(out, ref_out) < 1e-5
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)


def test_whole_step_picks_from_every_block_of_the_row_equal_xla(dtype):
    # l = d = l' = 4 over 300 compressed tokens: 300 selection blocks (512 padded), so a selecting
    # program of the whole step loads the Eq. 9 sums of 8 of the 16 query heads at a time (4096
    # floats; fails if a head group is skipped) and runs 16 argmax rounds (12 picks, padded) over
    # the row's 512 blocks; kernel 1 runs in 32 chunks of one 16-token tile. Ragged rows: the
    # query's block past the first 256, mid-row, the first (no compressed token yet).
    from pallas_kernels.gpu import decode_step
    from tests import oracle
    from tests.conftest import TOLERANCE

    keys = jax.random.split(jax.random.key(23), 5)
    lengths = jnp.asarray([1197, 530, 3], jnp.int32)
    q = jax.random.normal(keys[0], (3, 16, 16)).astype(dtype)
    k_cmp = jax.random.normal(keys[1], (3, 300, 1, 16)).astype(dtype)
    v_cmp = jax.random.normal(keys[2], (3, 300, 1, 8)).astype(dtype)
    raw_k = jax.random.normal(keys[3], (3, 3, 1200, 1, 16)).astype(dtype)
    raw_v = jax.random.normal(keys[4], (3, 3, 1200, 1, 8)).astype(dtype)
    geometry = dict(block_length=4, block_stride=4, selection_block_size=4, num_selected=12)
    kwargs = dict(geometry, num_initial_blocks=1, num_local_blocks=2, scale=0.25, window=9)
    *outputs, picks = decode_step.whole_step(
        q,
        raw_k,
        raw_v,
        k_cmp,
        v_cmp,
        lengths,
        **kwargs,
        launch=(16, 4, 2, 96),
        interpret=True,
        return_picks=True,
    )
    ref_indices = _compressed_selection("xla", q, k_cmp, v_cmp, lengths, **geometry, scale=0.25)[1]
    np.testing.assert_array_equal(np.asarray(picks), ref_indices)
    reference = decode_step_at(q, raw_k, raw_v, k_cmp, v_cmp, lengths, **kwargs)
    for out, ref in zip(outputs, reference, strict=True):
        assert out.dtype == dtype
        assert oracle.relative_error(out, ref) < TOLERANCE[dtype]


def test_kernel_one_block_sums_have_float32_precision():
    # Kernel 1's Eq. 9 sums per (head, selection block), relative to the running maximum of the
    # block's tile, against float64 sums of the same probabilities: small logits keep the float64
    # side's error far below float32's, so a 16-bit shortcut in the sums (errors up to 4e-6)
    # fails while float32 work (about 1e-7) passes. Geometry l=8, d=4, l'=16: own weights
    # (2, 2, 2, 1) and one back weight a block, the last token of the block before, which for
    # a tile's first block lies in the tile before (across chunks too: tile 16, 2 chunks of 3).
    from pallas_kernels.gpu import decode_step
    from pallas_kernels.gpu.tiles import LOG2E

    q, k_cmp, v_cmp, lengths = _step_inputs(5, 4, 16, 16, jnp.float32, kv_heads=1)
    q = 0.3 * q
    group, scale, tile = q.shape[1], 0.25, 16
    length_l, stride, block = _STEP["block_length"], _STEP["block_stride"], _STEP["selection_block_size"]
    ratio = block // stride
    kwargs = dict(_STEP, num_initial_blocks=1, num_local_blocks=2, scale=scale)
    _, _, _, tile_max, _, _, block_sums = decode_step.compressed_pass(
        q, k_cmp, v_cmp, lengths, **kwargs, launch=(tile, 4, 2, 6), interpret=True
    )
    logits = np.einsum("bgd,bsd->bgs", np.float64(q), np.float64(k_cmp[:, :, 0])) * scale * LOG2E
    first, weights = nsa_jax.reference.selection.overlap_weights(length_l, stride, block)
    slots = logits.shape[-1]
    blocks_per_tile = tile // ratio
    for b, length in enumerate(_LENGTHS):
        # Compressed tokens complete at the query (spec, Eqs. 7-8).
        visible = min((length - length_l) // stride + 1 if length >= length_l else 0, slots)
        checked = 0
        for j in range(block_sums.shape[-1]):
            t = j // blocks_per_tile
            if t * tile > visible:
                continue
            tokens = [i for i in range(ratio * j + first, ratio * (j + 1)) if 0 <= i < visible]
            maxima = np.float64(tile_max[b, 0, t, :group])
            expected = sum(weights[i - ratio * j - first] * np.exp2(logits[b, :, i] - maxima) for i in tokens)
            np.testing.assert_allclose(block_sums[b, 0, :group, j], expected, rtol=1e-6, atol=1e-30)
            checked += 1
        assert checked == min(-(-(visible + 1) // tile), 5) * blocks_per_tile


@pytest.mark.parametrize("launch", [None, (16, 4, 2, 6)], ids=["chunk_start", "tile_start"])
def test_the_block_after_the_visible_tokens_gets_its_eq9_share_of_the_block_before(launch):
    # t = 259: 64 compressed tokens visible, the last (63) covering raw tokens 252..259, so
    # Eq. 9 gives it to block 15 and, as its one back token, to block 16, the query's block,
    # which holds no visible token. Token 63 aligned with every query head makes blocks 15 and
    # 16 the two most important; with no forced local blocks, 16 is picked only if its back
    # share arrives. Slot 64 starts kernel 1's second chunk (default tile 64, two chunks), or
    # the second tile of the second chunk (tiles of 16, chunks of 3 tiles).
    from pallas_kernels.gpu import decode_step

    q, k_cmp, v_cmp, _ = _step_inputs(13, 4, 16, 16, jnp.float32, kv_heads=1)
    k_cmp = k_cmp.at[:, 63, 0].set(2.0 * jnp.sum(q, axis=1))
    lengths = jnp.full((q.shape[0],), 260, jnp.int32)
    kwargs = dict(_STEP, num_initial_blocks=1, num_local_blocks=0, scale=0.25)
    _, indices = decode_step.compressed_and_selection(
        q, k_cmp, v_cmp, lengths, **kwargs, launch=launch, interpret=True
    )
    ref_indices = _compressed_selection("xla", q, k_cmp, v_cmp, lengths, num_local_blocks=0, scale=0.25)[1]
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)
    assert all(15 in row and 16 in row for row in ref_indices[:, 0])


def test_decode_kernels_reject_selection_blocks_not_a_power_of_two_of_tokens():
    # Kernel 1's tiles hold whole selection blocks: l' / d = 48 / 16 = 3 tokens a block is refused
    # (and the registry's default then takes the xla step).
    from pallas_kernels.gpu import decode_step

    q, k_cmp, v_cmp, lengths = _step_inputs(3, 4, 16, 16, jnp.float32)
    kwargs = dict(block_length=32, block_stride=16, selection_block_size=48, num_selected=4)
    with pytest.raises(ValueError, match="power of two"):
        decode_step.check(q, k_cmp, v_cmp, lengths, **kwargs)
    decode_step.check(q, k_cmp, v_cmp, lengths, **dict(kwargs, selection_block_size=64))
    # The whole step's check (keys and values first) refuses the same.
    with pytest.raises(ValueError, match="power of two"):
        decode_step.check_whole_step(q, None, None, k_cmp, v_cmp, lengths, **kwargs, window=40)
