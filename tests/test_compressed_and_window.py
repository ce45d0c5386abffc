"""Compressed (Eqs. 7-8) and sliding-window branches against the dense oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import cudnn, registry
from nsa_jax.segments import num_compressed_slots
from tests import oracle
from tests.conftest import TOLERANCE, Inputs, jitted_vjp, packed_segment_ids

# (B, T, HQ, H, Dk, Dv): T never a multiple of l, d or l' used below.
SHAPES = [
    (2, 45, 4, 4, 16, 8),  # G = 1
    (1, 61, 4, 2, 24, 16),  # G = 2
    (2, 50, 8, 2, 16, 32),  # G = 4
    (1, 39, 16, 1, 32, 16),  # G = 16
]
# One compression geometry (l, d) and one window per shape keeps the suite short
# while every shape and every geometry is covered.
GEOMETRIES = [(8, 4), (16, 8), (4, 4), (8, 4)]
WINDOWS = [1, 7, 32, 16]
# Every shape unpacked; packed rows (segments) on the two extreme group sizes, G = 1 (two rows,
# many positions a tile) and G = 16 (one row, few positions a tile).
PACKED_SHAPES = (SHAPES[0], SHAPES[3])


def _cases(settings: list) -> list:
    """``(shape, setting, packed)`` for each shape and its geometry or window."""
    return [
        pytest.param(shape, setting, packed, id=f"{'packed' if packed else 'single'}-{shape}-{setting}")
        for shape, setting in zip(SHAPES, settings, strict=True)
        for packed in ((False, True) if shape in PACKED_SHAPES else (False,))
    ]


def _skip_unless_runs_here(op, implementation):
    """Skips code for another backend that cannot be interpreted (cuDNN on CPU)."""
    impl = registry.get(op, implementation)
    if jax.default_backend() not in impl.platforms and not impl.interpretable:
        pytest.skip(f"{implementation} runs only on {impl.platforms}, not in interpret mode")


def _skip_unless_served(op, implementation, *args, **kwargs):
    """Also skips arguments the implementation's ``check`` refuses (the cuDNN window and
    float32, or packed segments); ``args``/``kwargs`` as the ``check`` receives them."""
    _skip_unless_runs_here(op, implementation)
    impl = registry.get(op, implementation)
    if impl.check is not None:
        try:
            impl.check(*args, **kwargs)
        except ValueError as err:
            pytest.skip(f"{implementation} does not serve these arguments: {err}")


def _check_vjp(ours, theirs, args, cotangent, dtype, has_aux: bool = False):
    """Output and gradients of ``ours`` against ``theirs``; returns ``ours``' aux with ``has_aux``."""
    out, grads, *aux = jitted_vjp(ours, args, cotangent, has_aux)
    ref, ref_grads = jitted_vjp(theirs, args, cotangent.astype(jnp.float32))
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    assert oracle.relative_error(out, ref) < tol
    for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=False)):
        assert oracle.relative_error(grad, ref_grad) < tol, f"gradient {i}"
    return aux[0] if has_aux else None


@pytest.mark.parametrize("implementation", nsa_jax.implementations("compressed_attention"))
@pytest.mark.parametrize(("shape", "geometry", "packed"), _cases(GEOMETRIES))
def test_compressed_matches_oracle(implementation, shape, geometry, packed, dtype):
    _skip_unless_runs_here("compressed_attention", implementation)
    batch, length, q_heads, kv_heads, dk, dv = shape
    block_length, block_stride = geometry
    seed = hash((shape, geometry, packed)) % 1000
    inputs = Inputs(seed, batch, length, q_heads, kv_heads, dk, dv, dtype)
    slots = num_compressed_slots(length, block_stride)
    keys = jax.random.split(jax.random.key(seed + 1), 2)
    k_cmp = jax.random.normal(keys[0], (batch, slots, kv_heads, dk)).astype(dtype)
    v_cmp = jax.random.normal(keys[1], (batch, slots, kv_heads, dv)).astype(dtype)
    segment_ids = packed_segment_ids(batch, length, seed) if packed else None
    mask = oracle.compressed_mask(length, slots, kv_heads, block_length, block_stride, batch, segment_ids)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)

    def ours(q, k, v):
        return nsa_jax.compressed_attention(
            q,
            k,
            v,
            block_length=block_length,
            block_stride=block_stride,
            segment_ids=seg,
            implementation=implementation,
        )

    # The log-sum-exp is what selection rebuilds p_cmp from; -inf where nothing is visible.
    lse = _check_vjp(
        ours,
        lambda q, k, v: oracle.dense_attention(q, k, v, mask)[0],
        (inputs.q, k_cmp, v_cmp),
        inputs.cotangent,
        dtype,
        has_aux=True,
    )
    group = q_heads // kv_heads
    logits = (
        jnp.einsum(
            "bthd,bshd->bths",
            inputs.q.astype(jnp.float32),
            jnp.repeat(k_cmp.astype(jnp.float32), group, 2),
            precision=jax.lax.Precision.HIGHEST,
        )
        * dk**-0.5
    )
    full_mask = np.repeat(mask, group, axis=2)
    ref_lse = jax.nn.logsumexp(jnp.where(full_mask, logits, -jnp.inf), axis=-1)
    visible = full_mask.any(-1)
    assert np.all(np.isneginf(np.asarray(lse)[~visible]))
    np.testing.assert_allclose(np.asarray(lse)[visible], np.asarray(ref_lse)[visible], rtol=2e-5, atol=2e-5)


def test_compressed_with_standard_token_count():
    # Without segments, k_cmp may hold just the floor((T - l) / d) + 1 complete tokens.
    batch, length, block_length, block_stride = 1, 50, 8, 4
    inputs = Inputs(5, batch, length, 4, 2, 16, 8, jnp.float32)
    count = (length - block_length) // block_stride + 1
    k_cmp = jax.random.normal(jax.random.key(1), (batch, count, 2, 16))
    v_cmp = jax.random.normal(jax.random.key(2), (batch, count, 2, 8))
    out, _ = nsa_jax.compressed_attention(
        inputs.q, k_cmp, v_cmp, block_length=block_length, block_stride=block_stride
    )
    mask = oracle.compressed_mask(length, count, 2, block_length, block_stride, batch)
    assert oracle.relative_error(out, oracle.dense_attention(inputs.q, k_cmp, v_cmp, mask)[0]) < 2e-5
    assert np.all(np.asarray(out[:, : block_length - 1]) == 0.0)


@pytest.mark.parametrize("implementation", nsa_jax.implementations("sliding_window_attention"))
@pytest.mark.parametrize(("shape", "window", "packed"), _cases(WINDOWS))
def test_window_matches_oracle(implementation, shape, window, packed, dtype):
    _skip_unless_runs_here("sliding_window_attention", implementation)
    batch, length, q_heads, kv_heads, dk, dv = shape
    seed = hash((shape, window, packed)) % 1000
    inputs = Inputs(seed, batch, length, q_heads, kv_heads, dk, dv, dtype)
    segment_ids = packed_segment_ids(batch, length, seed) if packed else None
    mask = oracle.window_mask(batch, length, kv_heads, window, segment_ids)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    _skip_unless_served(
        "sliding_window_attention",
        implementation,
        inputs.q,
        inputs.k,
        inputs.v,
        window=window,
        scale=dk**-0.5,
        segment_ids=seg,
    )

    def ours(q, k, v):
        return nsa_jax.sliding_window_attention(
            q, k, v, window=window, segment_ids=seg, implementation=implementation
        )

    _check_vjp(
        ours,
        lambda q, k, v: oracle.dense_attention(q, k, v, mask)[0],
        (inputs.q, inputs.k, inputs.v),
        inputs.cotangent,
        dtype,
    )


@pytest.mark.parametrize("implementation", nsa_jax.implementations("sliding_window_attention"))
def test_window_covering_sequence_is_full_causal_attention(implementation, dtype):
    inputs = Inputs(9, 2, 77, 8, 2, 16, 16, dtype)
    _skip_unless_served(
        "sliding_window_attention", implementation, inputs.q, inputs.k, inputs.v, window=200, scale=16**-0.5
    )
    out = nsa_jax.sliding_window_attention(
        inputs.q, inputs.k, inputs.v, window=200, implementation=implementation
    )
    as_float = lambda x: x.astype(jnp.float32)
    ref = jax.nn.dot_product_attention(
        as_float(inputs.q), as_float(inputs.k), as_float(inputs.v), is_causal=True
    )
    assert oracle.relative_error(out, ref) < TOLERANCE[dtype]


def test_cudnn_window_refuses_what_it_cannot_serve():
    inputs = Inputs(3, 1, 40, 4, 2, 16, 16, jnp.bfloat16)
    kwargs = dict(window=8, scale=0.25)
    check = registry.get("sliding_window_attention", "cudnn").check
    check(inputs.q, inputs.k, inputs.v, **kwargs)
    with pytest.raises(ValueError, match="segment_ids must be None"):
        check(inputs.q, inputs.k, inputs.v, segment_ids=jnp.zeros((1, 40), jnp.int32), **kwargs)
    as_f32 = [x.astype(jnp.float32) for x in (inputs.q, inputs.k, inputs.v)]
    with pytest.raises(ValueError, match="q must be float16 or bfloat16"):
        check(*as_f32, **kwargs)
    wide = jnp.zeros((1, 40, 4, 264), jnp.bfloat16)
    with pytest.raises(ValueError, match="head dims Dk=264, Dv=16 must be multiples of 8 and at most"):
        check(wide, wide[:, :, :2], inputs.v, **kwargs)
    # Off a GPU no compute capability is known, so cuDNN's Dv != Dk path counts as pre-Hopper.
    with pytest.raises(ValueError, match="Dk=16 != Dv=8 need a Hopper"):
        check(inputs.q, inputs.k, inputs.v[..., :8], **kwargs)


def test_gpu_defaults(monkeypatch):
    # What implementation=None picks on a GPU backend, decided from the registry alone
    # (no GPU needed): the cuDNN window and compressed attention where they serve (bf16,
    # unpacked), else the Pallas kernels; the Pallas selection kernels.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    inputs = Inputs(4, 1, 40, 4, 2, 16, 16, jnp.bfloat16)
    window = dict(window=8, scale=0.25)
    assert registry.default("sliding_window_attention", inputs.q, inputs.k, inputs.v, **window) == "cudnn"
    as_f32 = [x.astype(jnp.float32) for x in (inputs.q, inputs.k, inputs.v)]
    assert registry.default("sliding_window_attention", *as_f32, **window) == "pallas_triton"
    packed = jnp.zeros((1, 40), jnp.int32)
    assert (
        registry.default(
            "sliding_window_attention", inputs.q, inputs.k, inputs.v, segment_ids=packed, **window
        )
        == "pallas_triton"
    )
    k_cmp = inputs.k[:, :10]
    compression = dict(block_length=8, block_stride=4, scale=0.25)
    assert registry.default("compressed_attention", inputs.q, k_cmp, k_cmp, **compression) == "cudnn"
    k_cmp_f32 = k_cmp.astype(jnp.float32)
    assert (
        registry.default("compressed_attention", as_f32[0], k_cmp_f32, k_cmp_f32, **compression)
        == "pallas_triton"
    )
    assert (
        registry.default("compressed_attention", inputs.q, k_cmp, k_cmp, segment_ids=packed, **compression)
        == "pallas_triton"
    )
    indices = jnp.zeros((1, 40, 2, 2), jnp.int32)
    assert (
        registry.default(
            "selected_attention", inputs.q, inputs.k, inputs.v, indices, block_size=8, scale=0.25
        )
        == "pallas_triton"
    )
    lse = jnp.zeros((1, 40, 4), jnp.float32)
    selection = dict(block_length=8, block_stride=4, selection_block_size=8, num_selected=3, scale=0.25)
    selection.update(num_initial_blocks=1, num_local_blocks=1)
    assert registry.default("select_blocks", inputs.q, k_cmp, lse, **selection) == "pallas_triton"


def test_bad_inputs_raise_naming_the_argument():
    inputs = Inputs(0, 1, 16, 4, 2, 8, 8, jnp.float32)
    k_cmp = inputs.k[:, :4]
    with pytest.raises(ValueError, match="block_stride must divide block_length"):
        nsa_jax.compressed_attention(inputs.q, k_cmp, k_cmp, block_length=6, block_stride=4)
    with pytest.raises(ValueError, match="k_cmp must hold at most"):
        nsa_jax.compressed_attention(inputs.q, inputs.k, inputs.v, block_length=8, block_stride=4)
    with pytest.raises(ValueError, match="compressed tokens"):
        nsa_jax.compressed_attention(inputs.q, k_cmp, inputs.v[:, :3], block_length=8, block_stride=4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        nsa_jax.sliding_window_attention(inputs.q, inputs.k, inputs.v, window=0)
    with pytest.raises(ValueError, match="sequence lengths"):
        nsa_jax.sliding_window_attention(inputs.q, inputs.k[:, :8], inputs.v[:, :8], window=4)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        nsa_jax.sliding_window_attention(inputs.q, inputs.k, inputs.v, window=4, scale=float("nan"))


def _xla_causal_attention(q, k, v, scale, with_lse):
    """A pure-JAX stand-in for cuDNN's causal call (``nsa_jax.cudnn.CausalAttention``): float32
    math, and like cuDNN no gradient through the returned lse."""
    group = q.shape[2] // k.shape[2]
    hi = jax.lax.Precision.HIGHEST
    keys = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    values = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), keys, precision=hi) * scale
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    logits = jnp.where(causal, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", jnp.exp(logits - lse[..., None]), values, precision=hi)
    out = out.astype(q.dtype)
    return (out, jax.lax.stop_gradient(jnp.swapaxes(lse, 1, 2))) if with_lse else out


@pytest.mark.parametrize(("shape", "geometry"), list(zip(SHAPES, GEOMETRIES, strict=True)), ids=str)
def test_compressed_by_position_rows_matches_reference(shape, geometry, dtype):
    # The cuDNN compressed attention's row mapping (one causal call over rows of d consecutive
    # positions), run with a pure-JAX causal core: output, lse and the gradients of both
    # against the reference, at T that is no multiple of l or d.
    batch, length, q_heads, kv_heads, dk, dv = shape
    block_length, block_stride = geometry
    inputs = Inputs(hash((shape, geometry)) % 1000, batch, length, q_heads, kv_heads, dk, dv, dtype)
    slots = num_compressed_slots(length, block_stride)
    keys = jax.random.split(jax.random.key(length), 3)
    k_cmp = jax.random.normal(keys[0], (batch, slots, kv_heads, dk)).astype(dtype)
    v_cmp = jax.random.normal(keys[1], (batch, slots, kv_heads, dv)).astype(dtype)
    dlse = jax.random.normal(keys[2], (batch, length, q_heads))
    geometry_kw = dict(block_length=block_length, block_stride=block_stride, scale=dk**-0.5)

    def ours(q, k, v):
        return cudnn.compressed_attention_by_rows(q, k, v, **geometry_kw, attend=_xla_causal_attention)

    def reference(q, k, v):
        return registry.get("compressed_attention", "xla").fn(q, k, v, **geometry_kw)

    (out, lse), vjp = jax.vjp(ours, inputs.q, k_cmp, v_cmp)
    f32 = [x.astype(jnp.float32) for x in (inputs.q, k_cmp, v_cmp, inputs.cotangent)]
    (ref, ref_lse), ref_vjp = jax.vjp(reference, *f32[:3])
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert oracle.relative_error(out, ref) < tol
    seen = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
    assert not seen[:, : block_length - 1].any() and seen[:, block_length - 1 :].all()
    assert oracle.relative_error(lse[seen], ref_lse[seen]) < tol
    dlse = jnp.where(jnp.asarray(seen), dlse, 0.0)
    for name, grad, ref_grad in zip(
        ("dq", "dk_cmp", "dv_cmp"), vjp((inputs.cotangent, dlse)), ref_vjp((f32[3], dlse)), strict=True
    ):
        assert oracle.relative_error(grad, ref_grad) < tol, name

    # Through the lse alone (the output's cotangent a symbolic zero).
    def lse_loss(attend, v):
        return lambda q, k: jnp.sum(jnp.where(seen, attend(q, k, v)[1], 0.0) * dlse)

    lse_grads = jax.grad(lse_loss(ours, v_cmp), (0, 1))(inputs.q, k_cmp)
    ref_lse_grads = jax.grad(lse_loss(reference, f32[2]), (0, 1))(*f32[:2])
    for grad, ref_grad in zip(lse_grads, ref_lse_grads, strict=True):
        assert oracle.relative_error(grad, ref_grad) < tol


def test_cudnn_compressed_refuses_what_it_cannot_serve():
    inputs = Inputs(3, 1, 40, 4, 2, 16, 8, jnp.bfloat16)
    geometry = dict(block_length=8, block_stride=4, scale=0.25)
    k_cmp, v_cmp = inputs.k[:, :10], inputs.k[:, :10]
    check = registry.get("compressed_attention", "cudnn").check
    check(inputs.q, k_cmp, v_cmp, **geometry)
    with pytest.raises(ValueError, match="segment_ids must be None"):
        check(inputs.q, k_cmp, v_cmp, segment_ids=jnp.zeros((1, 40), jnp.int32), **geometry)
    with pytest.raises(ValueError, match="q must be float16 or bfloat16"):
        check(inputs.q.astype(jnp.float32), k_cmp, v_cmp, **geometry)
    with pytest.raises(ValueError, match="must be multiples of 8"):
        check(inputs.q[..., :12], k_cmp[..., :12], v_cmp, **geometry)
    with pytest.raises(ValueError, match="Dk=16 != Dv=8 need a Hopper"):
        check(inputs.q, k_cmp, inputs.v[:, :10], **geometry)
    with pytest.raises(ValueError, match="at least block_length=8"):
        check(inputs.q[:, :7], k_cmp[:, :2], v_cmp[:, :2], **geometry)
    with pytest.raises(ValueError, match="the floor\\(\\(T - l\\) / d\\) \\+ 1 = 9 complete"):
        check(inputs.q, k_cmp[:, :8], v_cmp[:, :8], **geometry)
