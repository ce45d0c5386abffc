"""experiments/decode_floor.py: its streaming kernels (Pallas interpret mode here) compute what
they claim, and its steps read the bytes of the NSA decode step they stand for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import decode_floor
from experiments.bench_decode import PAPER, nsa_bytes


def test_stream_sums_every_tile_and_adds_what_it_depends_on():
    q = jax.random.normal(jax.random.key(0), (16, 64, 128), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (5, 3 * decode_floor.TILE, decode_floor.WIDTH), jnp.bfloat16)
    partials, *outputs = decode_floor.stream(q, x, outputs=2)
    dep = np.asarray(q, np.float32).reshape(-1)[:1024].sum()
    expected = np.asarray(x, np.float32).sum(axis=1) + dep
    np.testing.assert_allclose(np.asarray(partials), expected, rtol=1e-5, atol=1e-3)
    assert [o.shape for o in outputs] == [(16, 64, 128)] * 2
    # Programs 0..B-1 write row p of each output: the sum of their partial.
    np.testing.assert_allclose(np.asarray(outputs[0], np.float32)[:5, 0, 0], expected.sum(axis=1), rtol=1e-2)
    nothing_read = decode_floor.stream(q, x, outputs=0, tiles=0)[0]
    np.testing.assert_allclose(np.asarray(nothing_read), np.full((5, decode_floor.WIDTH), dep), rtol=1e-6)


def test_pick_reads_every_partial():
    partials = jax.random.normal(jax.random.key(2), (256, 256), jnp.float32)
    picked = decode_floor.pick(partials)
    assert picked.shape == (64, 16)
    np.testing.assert_allclose(np.asarray(picked), float(np.asarray(partials).sum()), rtol=1e-4)


@pytest.mark.parametrize("dk", [128, 192])
def test_the_launches_read_what_the_nsa_step_reads(dk):
    plan = decode_floor.read_plan(dk)
    tile_bytes = decode_floor.TILE_BYTES
    kernel1 = np.prod(plan["kernel1_bytes"]) * tile_bytes
    kernel3 = np.prod(plan["kernel3_bytes"]) * tile_bytes
    slots = (65536 - PAPER["block_length"]) // PAPER["block_stride"] + 1
    # Kernel 1's bytes are the compressed cache to within one slot; kernel 3's are the
    # selected and window tokens; together they are the NSA step's bytes.
    assert abs(kernel1 - 16 * 4 * slots * (dk + 128) * 2) <= 16 * 4 * (dk + 128) * 2
    assert kernel3 == 16 * 4 * (16 * 64 + 512) * (dk + 128) * 2
    assert abs(kernel1 + kernel3 - nsa_bytes(16, 65536, dk, 128)) / nsa_bytes(16, 65536, dk, 128) < 1e-3
    steps = decode_floor.steps(dk)
    assert steps["three_launches"][2] == steps["two_launches"][2] == kernel1 + kernel3


def test_only_the_paper_head_dims_are_planned():
    with pytest.raises(ValueError, match="dk"):
        decode_floor.read_plan(160)


def test_bad_shapes_are_refused():
    q = jnp.ones((16, 64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="x must be"):
        decode_floor.stream(q, jnp.ones((2, 100, decode_floor.WIDTH), jnp.bfloat16), outputs=0)
    with pytest.raises(ValueError, match="tiles must be"):
        decode_floor.stream(q, jnp.ones((2, 64, decode_floor.WIDTH), jnp.bfloat16), outputs=0, tiles=2)
    with pytest.raises(ValueError, match="partials must be"):
        decode_floor.pick(jnp.ones((256, 128), jnp.float32))
