"""Kernel-specific tests of the pallas_triton compressed attention (interpret mode on CPU).

The shared oracle test (``tests/test_compressed_and_window.py``) covers every registered
implementation at sizes that fit one or two tiles. These use 16-row, 16-token tiles so
that a sequence spans many query and key tiles (the unmasked middle run, masked edges,
key tiles straddling segments, a short ``Tc``), and differentiate through the
log-sum-exp as well as the output, against the ``xla`` reference; one case splits each
dK/dV key tile's query walk in six (float32 partials summed); the last key tile has fewer
query tiles than splits. The same kernels as a sliding window (``l = d = 1``) are checked
with windows that span several key tiles, packed and not.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.reference.compressed import compressed_attention as reference
from nsa_jax.reference.window import sliding_window_attention as window_reference
from pallas_kernels.gpu import compressed
from tests import oracle
from tests.conftest import jitted_vjp, packed_segment_ids

SMALL_TILES = compressed.CompressedTuning(
    fwd_rows=16, fwd_keys=16, dq_rows=16, dq_keys=16, dkv_rows=16, dkv_keys=16
)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "packed", "slots", "splits"),
    [(8, 2, True, None, 1), (4, 4, False, 36, 1), (8, 2, False, None, 6)],
    ids=["G4-packed", "G1-short-Tc", "G4-dkv-splits6"],
)
def test_many_tiles_and_lse_gradient(q_heads, kv_heads, packed, slots, splits):
    batch, length, dk, dv, block_length, block_stride = 2, 150, 24, 16, 8, 4
    slots = slots or -(-length // block_stride)
    keys = jax.random.split(jax.random.key(q_heads + slots), 5)
    q = jax.random.normal(keys[0], (batch, length, q_heads, dk))
    k_cmp = jax.random.normal(keys[1], (batch, slots, kv_heads, dk))
    v_cmp = jax.random.normal(keys[2], (batch, slots, kv_heads, dv))
    segment_ids = jnp.asarray(packed_segment_ids(batch, length, 3)) if packed else None
    kwargs = dict(
        block_length=block_length, block_stride=block_stride, scale=dk**-0.5, segment_ids=segment_ids
    )

    def ours(q, k, v):
        tuning = dataclasses.replace(SMALL_TILES, dkv_splits=splits)
        return compressed.compressed_attention(q, k, v, interpret=True, tuning=tuning, **kwargs)

    (out, lse), vjp = jax.vjp(ours, q, k_cmp, v_cmp)
    (ref, ref_lse), ref_vjp = jax.vjp(lambda q, k, v: reference(q, k, v, **kwargs), q, k_cmp, v_cmp)
    seen = np.isfinite(np.asarray(ref_lse))
    assert not seen.all() and seen.any()
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
    assert oracle.relative_error(out, ref) < 2e-5
    np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(ref_lse)[seen], rtol=2e-5, atol=2e-5)
    cotangent = jax.random.normal(keys[3], out.shape)
    dlse = jnp.where(jnp.asarray(seen), jax.random.normal(keys[4], lse.shape), 0.0)
    for i, (grad, ref_grad) in enumerate(
        zip(vjp((cotangent, dlse)), ref_vjp((cotangent, dlse)), strict=True)
    ):
        assert oracle.relative_error(grad, ref_grad) < 2e-5, f"gradient {i}"


@pytest.mark.parametrize(("window", "packed"), [(37, True), (20, False), (200, False)])
def test_window_over_many_tiles(window, packed):
    # Windows wider and narrower than a 16-token key tile, and one covering the sequence:
    # the band's edges fall inside tiles, so every loop's masked and unmasked runs occur.
    batch, length, q_heads, kv_heads, dk, dv = 2, 130, 4, 2, 24, 16
    keys = jax.random.split(jax.random.key(window), 4)
    q = jax.random.normal(keys[0], (batch, length, q_heads, dk))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dk))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dv))
    segment_ids = jnp.asarray(packed_segment_ids(batch, length, 5)) if packed else None
    kwargs = dict(window=window, scale=dk**-0.5, segment_ids=segment_ids)

    def ours(q, k, v):
        return compressed.sliding_window_attention(q, k, v, interpret=True, tuning=SMALL_TILES, **kwargs)

    cotangent = jax.random.normal(keys[3], (batch, length, q_heads, dv))
    out, grads = jitted_vjp(ours, (q, k, v), cotangent)
    ref, ref_grads = jitted_vjp(lambda q, k, v: window_reference(q, k, v, **kwargs), (q, k, v), cotangent)
    assert oracle.relative_error(out, ref) < 2e-5
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert oracle.relative_error(grad, ref_grad) < 2e-5


def test_tuning_rejects_bad_tiles():
    with pytest.raises(ValueError, match="fwd_rows must be a power of two >= 16"):
        compressed.CompressedTuning(fwd_rows=24)
    with pytest.raises(ValueError, match="dq_warps must be positive"):
        compressed.CompressedTuning(dq_warps=0)
