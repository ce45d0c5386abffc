"""Pallas TPU kernels (pallas_kernels/tpu), run in TPU interpret mode on CPU.

The shared op tests (test_selected_attention.py, test_compressed_and_window.py) cover
the kernels through the registry; these check the pieces specific to them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import nsa_jax
from pallas_kernels.tpu import core, dense, selection
from pallas_kernels.tpu.block_sizes import TpuBlockSizes, block_sizes_for
from pallas_kernels.tpu.inverse_map import build_inverse_map, touched_tiles
from tests import oracle
from tests.conftest import TOLERANCE, Inputs, jitted_vjp, packed_segment_ids, random_block_indices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registered_for_three_ops_and_not_default_on_cpu():
    for op in ("selected_attention", "compressed_attention", "sliding_window_attention"):
        assert "pallas_tpu" in nsa_jax.implementations(op)
    assert "pallas_tpu" not in nsa_jax.implementations("select_blocks")
    inputs = Inputs(0, 1, 16, 2, 1, 8, 8, jnp.float32)
    # On CPU the default is not the TPU kernel; asking for it by name interprets it.
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        nsa_jax.sliding_window_attention(
            inputs.q.astype(jnp.float16),
            inputs.k.astype(jnp.float16),
            inputs.v.astype(jnp.float16),
            window=4,
            implementation="pallas_tpu",
        )


def test_inverse_map_lists_every_pair_once_grouped_by_key_tile():
    rng = np.random.default_rng(0)
    batch, heads, num_q, width, num_k = 2, 3, 5, 4, 7
    counts = rng.integers(0, width + 1, size=(batch, heads, num_q)).astype(np.int32)
    tiles = np.zeros((batch, heads, num_q, width), np.int32)
    for index in np.ndindex(batch, heads, num_q):
        chosen = np.sort(rng.choice(num_k, size=counts[index], replace=False))
        tiles[index][: len(chosen)] = chosen
        tiles[index][len(chosen) :] = chosen[-1] if len(chosen) else 0
    counts[0, 0] = 0  # one (batch, head) with no entries at all
    key_tiles, query_tiles, num_entries = map(
        np.asarray, build_inverse_map(jnp.asarray(tiles), jnp.asarray(counts), num_k)
    )
    touched = np.asarray(touched_tiles(jnp.asarray(key_tiles), jnp.asarray(num_entries), num_k))
    for b, h in np.ndindex(batch, heads):
        expected = sorted((tiles[b, h, i, u], i) for i in range(num_q) for u in range(counts[b, h, i]))
        count = num_entries[b, h]
        assert count == len(expected)
        got = list(zip(key_tiles[b, h, :count].tolist(), query_tiles[b, h, :count].tolist(), strict=True))
        assert got == expected  # sorted by key tile, so each key tile's entries are consecutive
        tail = (key_tiles[b, h, count - 1], query_tiles[b, h, count - 1]) if count else (0, 0)
        assert np.all(key_tiles[b, h, count:] == tail[0]) and np.all(query_tiles[b, h, count:] == tail[1])
        assert touched[b, h].tolist() == [any(k == a for k, _ in expected) for a in range(num_k)]


def test_selection_tile_lists_are_the_union_of_touched_tiles():
    batch, length, heads, slots, block_size = 2, 45, 2, 4, 8
    segment_ids = packed_segment_ids(batch, length, 3)
    indices = random_block_indices(batch, length, heads, slots, block_size, 3, segment_ids)
    rows = oracle.segments_of(segment_ids, batch, length)
    starts = np.array([[oracle.segment_start_of(rows[b], t) for t in range(length)] for b in range(batch)])
    first_keys = np.where(indices >= 0, starts[:, :, None, None] + indices * block_size, core.INVALID)
    per_tile, key_tile = 16, 8
    num_key_tiles = -(-length // key_tile)
    tiles, counts = map(
        np.asarray,
        selection.tile_lists(
            jnp.asarray(first_keys, jnp.int32),
            block_size=block_size,
            key_tile=key_tile,
            num_key_tiles=num_key_tiles,
            queries_per_tile=per_tile,
            aligned=False,
        ),
    )
    for b, h in np.ndindex(batch, heads):
        for i in range(tiles.shape[2]):
            want = set()
            for t in range(i * per_tile, min((i + 1) * per_tile, length)):
                for first in first_keys[b, t, h]:
                    if first >= 0:
                        want |= {p // key_tile for p in range(first, min(first + block_size, t + 1))}
            assert tiles[b, h, i, : counts[b, h, i]].tolist() == sorted(want)


def _selected_case(shape, dtype, seed, packed):
    batch, length, q_heads, kv_heads, dk, dv, block_size, slots = shape
    inputs = Inputs(seed, batch, length, q_heads, kv_heads, dk, dv, dtype)
    segment_ids = packed_segment_ids(batch, length, seed) if packed else None
    indices = random_block_indices(batch, length, kv_heads, slots, block_size, seed, segment_ids)
    mask = oracle.selected_mask(indices, block_size, segment_ids)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    return inputs, jnp.asarray(indices), seg, mask


def _check_against_oracle(fn, inputs, mask, dtype):
    args = (inputs.q, inputs.k, inputs.v)
    out, grads = jitted_vjp(fn, args, inputs.cotangent)
    ref, ref_grads = jitted_vjp(
        lambda q, k, v: oracle.dense_attention(q, k, v, mask)[0], args, inputs.cotangent.astype(jnp.float32)
    )
    tol = TOLERANCE[dtype]
    assert oracle.relative_error(out, ref) < tol
    for name, grad, ref_grad in zip("qkv", grads, ref_grads, strict=True):
        assert oracle.relative_error(grad, ref_grad) < tol, name
    return out, grads


def test_index_lists_over_the_smem_budget_are_chunked():
    # A budget of 200 words splits the forward and dQ into 2 pallas_calls, dK/dV into 3.
    shape = (2, 45, 8, 2, 16, 32, 8, 5)
    inputs, indices, seg, mask = _selected_case(shape, jnp.float32, 5, packed=True)
    tiny = TpuBlockSizes(query_rows=16, smem_words=200)
    batch, heads = 2, 2
    num_q = -(-45 // 4)  # G = 4 heads, 16 rows: 4 queries per tile
    assert tiny.smem_words // (batch * heads * (6 + 1)) < num_q  # the forward really is split

    def chunked(q, k, v):
        return selection.selected_attention(
            q, k, v, indices, block_size=8, scale=16**-0.5, segment_ids=seg, interpret=True, block_sizes=tiny
        )

    _check_against_oracle(chunked, inputs, mask, jnp.float32)
    loss = lambda q, k, v: jnp.sum(chunked(q, k, v))
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(inputs.q, inputs.k, inputs.v))
    assert jaxpr.count("pallas_call[") == 2 + 2 + 3  # forward, dQ, dK/dV

    def window(q, k, v, sizes):
        return jax.jit(
            lambda q, k, v: dense.sliding_window_attention(
                q, k, v, window=9, scale=16**-0.5, segment_ids=seg, interpret=True, block_sizes=sizes
            )
        )(q, k, v)

    tiny_window = TpuBlockSizes(query_rows=16, key_tile=8, smem_words=100)
    np.testing.assert_allclose(
        window(inputs.q, inputs.k, inputs.v, tiny_window),
        window(inputs.q, inputs.k, inputs.v, None),
        rtol=1e-5,
        atol=1e-6,
    )


def test_paper_head_dims_192_128():
    shape = (1, 24, 4, 1, 192, 128, 8, 3)
    assert block_sizes_for(192, 128, jnp.bfloat16).query_rows % 8 == 0
    inputs, indices, _, mask = _selected_case(shape, jnp.float32, 2, packed=False)
    _check_against_oracle(
        lambda q, k, v: nsa_jax.selected_attention(
            q, k, v, indices, block_size=8, implementation="pallas_tpu"
        ),
        inputs,
        mask,
        jnp.float32,
    )


def test_race_detection_finds_no_race():
    races = pltpu.InterpretParams(detect_races=True)  # on_race="raise" by default
    shape = (1, 20, 4, 2, 16, 8, 8, 3)
    inputs, indices, seg, mask = _selected_case(shape, jnp.float32, 4, packed=True)
    _check_against_oracle(
        lambda q, k, v: selection.selected_attention(
            q, k, v, indices, block_size=8, scale=16**-0.5, segment_ids=seg, interpret=races
        ),
        inputs,
        mask,
        jnp.float32,
    )
    k_cmp, v_cmp = inputs.k[:, :5], inputs.v[:, :5]
    out, _ = dense.compressed_attention(
        inputs.q, k_cmp, v_cmp, block_length=8, block_stride=4, scale=0.25, interpret=races
    )
    assert np.all(np.isfinite(np.asarray(out)))
    # on_race="raise" already fails the calls above on a race; also read the detector's state.
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    state = getattr(interpret_pallas_call, "races", None)
    assert state is None or not state.races_found


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    import nsa_jax
    from nsa_jax.sharding import sharded_ops
    from tests.conftest import Inputs, packed_segment_ids, random_block_indices

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    ops = sharded_ops(mesh)
    B, T, HQ, H = 4, 24, 4, 2
    x = Inputs(1, B, T, HQ, H, 16, 8, jnp.float32)
    seg = jnp.asarray(packed_segment_ids(B, T, 1))
    idx = jnp.asarray(random_block_indices(B, T, H, 3, 8, 1, np.asarray(seg)))

    def both(fn, *args, **kw):
        return fn(*args, implementation="pallas_tpu", **kw)

    def check(a, b, what):
        for x_, y_ in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x_), np.asarray(y_), rtol=1e-5, atol=1e-6, err_msg=what)

    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * x.cotangent)
    sel_kw = dict(block_size=8, segment_ids=seg, implementation="pallas_tpu")
    sel = lambda f: lambda q, k, v: f(q, k, v, idx, **sel_kw)
    one = jax.value_and_grad(loss(sel(nsa_jax.selected_attention)), argnums=(0, 1, 2))(x.q, x.k, x.v)
    many = jax.jit(jax.value_and_grad(loss(sel(ops.selected_attention)), argnums=(0, 1, 2)))(x.q, x.k, x.v)
    check(many, one, "selected")
    win = dict(window=5, segment_ids=seg, implementation="pallas_tpu")
    check(ops.sliding_window_attention(x.q, x.k, x.v, **win),
          nsa_jax.sliding_window_attention(x.q, x.k, x.v, **win), "window")
    cmp = dict(block_length=8, block_stride=4, segment_ids=seg, implementation="pallas_tpu")
    kc, vc = x.k[:, :6], x.v[:, :6]
    check(ops.compressed_attention(x.q, kc, vc, **cmp), nsa_jax.compressed_attention(x.q, kc, vc, **cmp),
          "compressed")
    print("SHARDED_OK")
    """
)


def test_shard_mapped_ops_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert "SHARDED_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


def test_kernels_lower_to_mosaic_for_tpu():
    # Cross-platform export runs the Pallas TPU lowering (kernel to Mosaic MLIR, block
    # shape checks) without a TPU; Mosaic's own compilation happens on a TPU only.
    batch, length, q_heads, kv_heads, dk, dv = 1, 256, 32, 2, 192, 128
    inputs = Inputs(0, batch, length, q_heads, kv_heads, dk, dv, jnp.bfloat16)
    indices = jnp.asarray(random_block_indices(batch, length, kv_heads, 4, 64, 0))
    segment_ids = jnp.zeros((batch, length), jnp.int32)
    branches = {
        "selected": lambda q, k, v: selection.selected_attention(
            q, k, v, indices, block_size=64, scale=0.1, segment_ids=segment_ids
        ),
        "window": lambda q, k, v: dense.sliding_window_attention(
            q, k, v, window=100, scale=0.1, segment_ids=segment_ids
        ),
        "compressed": lambda q, k, v: dense.compressed_attention(
            q, k[:, :16], v[:, :16], block_length=32, block_stride=16, scale=0.1, segment_ids=segment_ids
        )[0],
    }
    for name, branch in branches.items():
        grad = jax.grad(lambda q, k, v, f=branch: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
        exported = jax.export.export(jax.jit(grad), platforms=["tpu"])(inputs.q, inputs.k, inputs.v)
        # forward, dQ and dK/dV kernels
        assert exported.mlir_module().count("tpu_custom_call") == 3, name


def test_nsa_attention_with_tpu_branches_matches_xla():
    batch, length, q_heads, kv_heads, dk, dv = 1, 40, 4, 2, 16, 8
    keys = jax.random.split(jax.random.key(3), 8)
    q = jax.random.normal(keys[0], (batch, length, q_heads, dk))
    raw = lambda key, dim: jax.random.normal(key, (batch, length, kv_heads, dim))
    k_cmp = jax.random.normal(keys[1], (batch, length // 4, kv_heads, dk))
    v_cmp = jax.random.normal(keys[2], (batch, length // 4, kv_heads, dv))
    gates = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, length, q_heads, 3)))
    segment_ids = jnp.asarray(packed_segment_ids(batch, length, 3))
    args = (q, k_cmp, v_cmp, raw(keys[4], dk), raw(keys[5], dv), raw(keys[6], dk), raw(keys[7], dv), gates)
    kwargs = dict(
        block_length=8,
        block_stride=4,
        selection_block_size=8,
        num_selected=4,
        window=6,
        segment_ids=segment_ids,
    )
    tpu = {
        op: "pallas_tpu" for op in ("compressed_attention", "selected_attention", "sliding_window_attention")
    }
    out = nsa_jax.nsa_attention(*args, **kwargs, implementation=tpu)
    ref = nsa_jax.nsa_attention(*args, **kwargs, implementation="xla")
    assert oracle.relative_error(out, ref) < 2e-5
