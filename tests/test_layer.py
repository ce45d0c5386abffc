"""nsa_attention (Eq. 5), the NNX layer, its Linen bridge and config checks."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from nsa_jax.segments import num_compressed_slots
from nsa_jax.sharding import LOGICAL_AXIS_RULES, logical_names, logical_to_mesh_axes, parameter_shardings
from tests import oracle
from tests.conftest import Inputs, packed_segment_ids
from tests.test_selection import brute_force_selection

SMALL = nsa_jax.NSAConfig(
    model_dim=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim_qk=16,
    head_dim_v=8,
    block_length=8,
    block_stride=4,
    selection_block_size=16,
    num_selected=4,
    window=12,
)


@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_nsa_attention_is_the_gated_sum_of_oracle_branches(packed):
    c = SMALL
    batch, length = 2, 75
    inputs = Inputs(3, batch, length, c.num_heads, c.num_kv_heads, c.head_dim_qk, c.head_dim_v, jnp.float32)
    keys = jax.random.split(jax.random.key(8), 6)
    slots = num_compressed_slots(length, c.block_stride)
    k_cmp = jax.random.normal(keys[0], (batch, slots, c.num_kv_heads, c.head_dim_qk))
    v_cmp = jax.random.normal(keys[1], (batch, slots, c.num_kv_heads, c.head_dim_v))
    k_win = jax.random.normal(keys[2], inputs.k.shape)
    v_win = jax.random.normal(keys[3], inputs.v.shape)
    gates = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, length, c.num_heads, 3)))
    segment_ids = packed_segment_ids(batch, length, 3) if packed else None
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    kwargs = {k: v for k, v in c.attention_kwargs().items() if k != "implementation"}
    out = jax.jit(functools.partial(nsa_jax.nsa_attention, **kwargs))(
        inputs.q, k_cmp, v_cmp, inputs.k, inputs.v, k_win, v_win, gates, segment_ids=seg
    )

    cmp_mask = oracle.compressed_mask(
        length, slots, c.num_kv_heads, c.block_length, c.block_stride, batch, segment_ids
    )
    cmp_out, probs = oracle.dense_attention(inputs.q, k_cmp, v_cmp, cmp_mask)
    indices = brute_force_selection(
        np.asarray(probs),
        c.num_kv_heads,
        c.block_length,
        c.block_stride,
        c.selection_block_size,
        c.num_selected,
        1,
        2,
        segment_ids,
    )
    slc_out, _ = oracle.dense_attention(
        inputs.q, inputs.k, inputs.v, oracle.selected_mask(indices, c.selection_block_size, segment_ids)
    )
    win_out, _ = oracle.dense_attention(
        inputs.q, k_win, v_win, oracle.window_mask(batch, length, c.num_kv_heads, c.window, segment_ids)
    )
    ref = gates[..., 0:1] * cmp_out + gates[..., 1:2] * slc_out + gates[..., 2:3] * win_out
    assert oracle.relative_error(out, ref) < 2e-5


def _layer(config=SMALL, seed=0):
    return nsa_jax.NativeSparseAttention(config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("compression", ["mlp", "mean"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_layer_runs_under_jit_and_grad(compression, dtype):
    layer = _layer(dataclasses.replace(SMALL, compression=compression, dtype=dtype))
    x = jax.random.normal(jax.random.key(1), (2, 45, SMALL.model_dim))

    @nnx.jit
    def loss(layer, x):
        return jnp.mean(layer(x).astype(jnp.float32) ** 2)

    y = nnx.jit(lambda layer, x: layer(x))(layer, x)
    assert y.shape == x.shape and y.dtype == dtype
    grads = nnx.grad(loss)(layer, x)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_layer_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        config = dataclasses.replace(SMALL, dtype=jnp.float64, param_dtype=jnp.float64)
        layer = _layer(config)
        graphdef, params = nnx.split(layer)
        x = jax.random.normal(jax.random.key(2), (1, 37, config.model_dim), jnp.float64)
        target = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)

        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x) * target)

        # Jitted: compiling each whole function once is far cheaper than op-by-op dispatch here.
        grad_params, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(4), p.shape, p.dtype), params)
        dx = jax.random.normal(jax.random.key(5), x.shape, jnp.float64)
        eps = 1e-5
        shifted = jax.jit(
            lambda s: loss(jax.tree.map(lambda p, d: p + s * eps * d, params, direction), x + s * eps * dx)
        )
        numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
        analytic = sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree.leaves(grad_params), jax.tree.leaves(direction), strict=False)
        )
        analytic = analytic + jnp.vdot(grad_x, dx)
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)


def test_packed_segments_do_not_see_each_other():
    layer = _layer()
    length = 90
    segment_ids = jnp.asarray(np.repeat([0, 1, 2], [37, 30, 23])[None], jnp.int32)
    x = jax.random.normal(jax.random.key(6), (1, length, SMALL.model_dim))
    changed = x.at[:, 37:67].set(jax.random.normal(jax.random.key(7), (1, 30, SMALL.model_dim)))
    forward = nnx.jit(lambda layer, x, segment_ids=None: layer(x, segment_ids=segment_ids))
    y, y_changed = forward(layer, x, segment_ids), forward(layer, changed, segment_ids)
    untouched = np.r_[0:37, 67:90]
    np.testing.assert_allclose(
        np.asarray(y_changed[:, untouched]), np.asarray(y[:, untouched]), rtol=1e-6, atol=1e-6
    )
    assert not np.allclose(np.asarray(y_changed[:, 37:67]), np.asarray(y[:, 37:67]))
    # A packed segment behaves as the same tokens alone (positions restart per segment).
    alone = forward(layer, x[:, 67:])
    np.testing.assert_allclose(np.asarray(alone), np.asarray(y[:, 67:]), rtol=1e-5, atol=1e-5)


def test_linen_bridge_initialises_and_applies():
    module = nsa_jax.native_sparse_attention_linen(SMALL)
    x = jax.random.normal(jax.random.key(1), (2, 40, SMALL.model_dim))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    y = jax.jit(module.apply)(variables, x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    grads = jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2)))(variables)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_parameters_carry_logical_axes_that_map_to_a_mesh():
    layer = _layer()
    params = nnx.state(layer, nnx.Param)
    assert logical_names(layer.w_query) == ("embed", "heads", "head_dim")
    assert logical_names(layer.w_key) == ("embed", "branch", "kv_heads", "head_dim")
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = parameter_shardings(params, mesh)
    assert shardings["w_query"].spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    # A mesh axis shards at most one dimension of an array.
    assert logical_to_mesh_axes(("mlp", "heads", "branch"), LOGICAL_AXIS_RULES) == jax.sharding.PartitionSpec(
        "tensor", None, None
    )
    with pytest.raises(ValueError, match="has no rule"):
        logical_to_mesh_axes(("nonsense",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_heads=6, num_kv_heads=4), "num_heads must be divisible by num_kv_heads"),
        (dict(block_length=12, block_stride=8), r"block_stride must divide block_length"),
        (dict(selection_block_size=18), r"block_stride must divide selection_block_size"),
        (
            dict(block_length=32, selection_block_size=16),
            r"block_length must not exceed selection_block_size",
        ),
        (dict(num_selected=2), "num_selected must be at least"),
        (dict(head_dim_qk=15), "head_dim_qk must be even"),
        (dict(compression="max"), "compression must be 'mlp' or 'mean'"),
        (dict(window=0), "NSAConfig.window must be a positive int"),
        (dict(num_initial_blocks=-1), "NSAConfig.num_initial_blocks must be a non-negative int"),
        (dict(dtype=jnp.int32), "NSAConfig.dtype must be a floating dtype"),
    ],
)
def test_config_rules_raise_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **change)


def test_paper_defaults():
    c = nsa_jax.NSAConfig(model_dim=1024)
    assert (c.block_length, c.block_stride, c.selection_block_size, c.num_selected, c.window) == (
        32,
        16,
        64,
        16,
        512,
    )
    assert (c.num_heads, c.num_kv_heads, c.group_size, c.head_dim_qk, c.head_dim_v) == (64, 4, 16, 192, 128)
    assert (c.num_initial_blocks, c.num_local_blocks) == (1, 2)


def test_layer_bad_inputs_raise():
    layer = _layer()
    x = jnp.ones((1, 20, SMALL.model_dim))
    with pytest.raises(ValueError, match="x must have rank 3"):
        layer(x[0])
    with pytest.raises(ValueError, match="x must have last axis model_dim"):
        layer(x[..., :10])
    with pytest.raises(TypeError, match="x must be a floating array"):
        layer(x.astype(jnp.int32))
    with pytest.raises(ValueError, match="positions must have shape"):
        layer(x, positions=jnp.zeros((1, 19), jnp.int32))
    with pytest.raises(TypeError, match="config must be an NSAConfig"):
        nsa_jax.NativeSparseAttention({"model_dim": 32}, rngs=nnx.Rngs(0))


def test_tiny_language_model_learns(tmp_path: pathlib.Path):
    from experiments import train

    config = dataclasses.replace(
        train.PRESETS["cpu"](), steps=80, seq_len=128, eval_every=80, corpus_bytes=500_000
    )
    summary = train.train(config, tmp_path, progress=False)
    # Uniform over 256 bytes is 5.55 nats; a model that learned nothing stays near it.
    assert summary["first_loss"] > 5.0
    assert summary["final_loss"] < 3.3
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 80
