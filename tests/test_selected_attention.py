"""Selected attention (spec, Eq. 12): every registered implementation against the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from tests import oracle
from tests.conftest import (
    TOLERANCE,
    Inputs,
    jitted_vjp,
    packed_segment_ids,
    random_block_indices,
    selected_implementations,
)

IMPLEMENTATIONS = selected_implementations()

# (B, T, HQ, H, Dk, Dv, block_size, n): T never a multiple of the block size.
SHAPES = [
    (2, 37, 4, 4, 16, 8, 8, 3),  # G = 1
    (1, 70, 4, 2, 24, 16, 16, 4),  # G = 2, Dk not a power of two
    (2, 45, 8, 2, 16, 32, 8, 5),  # G = 4, Dv > Dk
    (1, 50, 16, 1, 32, 16, 16, 3),  # G = 16
]
# Every shape unpacked; packed rows (segments) on the two extreme group sizes, G = 1 and G = 16.
CASES = [
    pytest.param(shape, packed, id=f"{'packed' if packed else 'single'}-{'x'.join(map(str, shape))}")
    for shape, packed in [(shape, False) for shape in SHAPES] + [(SHAPES[0], True), (SHAPES[3], True)]
]


def _case(shape, dtype, seed, packed):
    batch, length, q_heads, kv_heads, dk, dv, block_size, num_slots = shape
    inputs = Inputs(seed, batch, length, q_heads, kv_heads, dk, dv, dtype)
    segment_ids = packed_segment_ids(batch, length, seed) if packed else None
    indices = random_block_indices(batch, length, kv_heads, num_slots, block_size, seed, segment_ids)
    mask = oracle.selected_mask(indices, block_size, segment_ids)
    return inputs, segment_ids, indices, mask, block_size


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("shape", "packed"), CASES)
def test_forward_and_gradients_match_oracle(implementation, shape, packed, dtype):
    seed = hash((shape, packed)) % 1000
    inputs, segment_ids, indices, mask, block_size = _case(shape, dtype, seed, packed)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)

    def ours(q, k, v):
        return nsa_jax.selected_attention(
            q,
            k,
            v,
            jnp.asarray(indices),
            block_size=block_size,
            segment_ids=seg,
            implementation=implementation,
        )

    def theirs(q, k, v):
        return oracle.dense_attention(q, k, v, mask)[0]

    args = (inputs.q, inputs.k, inputs.v)
    out, grads = jitted_vjp(ours, args, inputs.cotangent)
    ref, ref_grads = jitted_vjp(theirs, args, inputs.cotangent.astype(jnp.float32))
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOLERANCE[dtype]
    assert oracle.relative_error(out, ref) < tol
    for name, grad, ref_grad in zip("qkv", grads, ref_grads, strict=False):
        assert grad.dtype == dtype, name
        assert oracle.relative_error(grad, ref_grad) < tol, name


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_block_selected_is_full_causal_attention(implementation):
    batch, length, block_size = 2, 53, 8
    inputs = Inputs(7, batch, length, 8, 2, 16, 16, jnp.float32)
    num_blocks = -(-length // block_size)
    indices = np.broadcast_to(np.arange(num_blocks, dtype=np.int32), (batch, length, 2, num_blocks))
    out = nsa_jax.selected_attention(
        inputs.q,
        inputs.k,
        inputs.v,
        jnp.asarray(indices),
        block_size=block_size,
        implementation=implementation,
    )
    ref = jax.nn.dot_product_attention(inputs.q, inputs.k, inputs.v, is_causal=True)
    assert oracle.relative_error(out, ref) < TOLERANCE[jnp.float32]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_unused_slots_give_zero_not_nan(implementation):
    inputs = Inputs(3, 1, 20, 4, 2, 16, 8, jnp.float32)
    indices = jnp.full((1, 20, 2, 3), -1, jnp.int32)
    out = nsa_jax.selected_attention(
        inputs.q, inputs.k, inputs.v, indices, block_size=8, implementation=implementation
    )
    assert np.all(np.asarray(out) == 0.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_order_of_slots_does_not_matter(implementation):
    batch, length, block_size = 1, 40, 8
    inputs = Inputs(11, batch, length, 4, 1, 16, 8, jnp.float32)
    indices = random_block_indices(batch, length, 1, 4, block_size, 11)
    reversed_indices = indices[..., ::-1].copy()
    run = lambda idx: nsa_jax.selected_attention(
        inputs.q, inputs.k, inputs.v, jnp.asarray(idx), block_size=block_size, implementation=implementation
    )
    assert oracle.relative_error(run(reversed_indices), run(indices)) < 1e-6


def test_bad_inputs_raise_naming_the_argument():
    inputs = Inputs(0, 1, 16, 4, 2, 8, 8, jnp.float32)
    good = jnp.zeros((1, 16, 2, 2), jnp.int32)
    call = nsa_jax.selected_attention
    with pytest.raises(ValueError, match="block_indices must lie in"):
        call(inputs.q, inputs.k, inputs.v, good.at[0, 0, 0, 0].set(2), block_size=8)
    # Indices closed over by a jitted function are concrete: still checked, and a valid set runs.
    bad = good.at[0, 0, 0, 0].set(2)
    with pytest.raises(ValueError, match="block_indices must lie in"):
        jax.jit(lambda q: call(q, inputs.k, inputs.v, bad, block_size=8))(inputs.q)
    assert jax.jit(lambda q: call(q, inputs.k, inputs.v, good, block_size=8))(inputs.q).shape == (1, 16, 4, 8)
    with pytest.raises(ValueError, match="block_indices must have shape"):
        call(inputs.q, inputs.k, inputs.v, good[:, :, :1], block_size=8)
    with pytest.raises(TypeError, match="block_indices must be an integer array"):
        call(inputs.q, inputs.k, inputs.v, good.astype(jnp.float32), block_size=8)
    with pytest.raises(ValueError, match="q must have rank 4"):
        call(inputs.q[0], inputs.k, inputs.v, good, block_size=8)
    with pytest.raises(ValueError, match="must be a multiple of the key/value heads"):
        call(inputs.q[:, :, :3], inputs.k, inputs.v, good, block_size=8)
    with pytest.raises(TypeError, match="must share one dtype"):
        call(inputs.q.astype(jnp.bfloat16), inputs.k, inputs.v, good, block_size=8)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        call(inputs.q, inputs.k, inputs.v, good, block_size=0)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        call(inputs.q, inputs.k, inputs.v, good, block_size=8, segment_ids=jnp.zeros((1, 15), jnp.int32))
    with pytest.raises(ValueError, match="implementation must be one of"):
        call(inputs.q, inputs.k, inputs.v, good, block_size=8, implementation="nope")
