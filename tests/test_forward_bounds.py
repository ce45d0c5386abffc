"""experiments/forward_bounds.py: its work counts against the reference's own masks and picks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from experiments import forward_bounds
from nsa_jax.reference.compressed import compressed_visibility
from nsa_jax.reference.selected import selected_key_positions
from nsa_jax.reference.selection import top_blocks
from nsa_jax.segments import compressed_token_starts, num_compressed_slots

# Lengths that are not multiples of l, d or l'.
LENGTH = 301


@pytest.mark.parametrize("block_length, block_stride", [(32, 16), (8, 4), (16, 16)])
def test_visible_compressed_tokens_count_the_reference_mask(block_length, block_stride):
    starts = jnp.zeros((1, LENGTH), jnp.int32)
    slots = num_compressed_slots(LENGTH, block_stride)
    tokens = compressed_token_starts(starts, slots, block_length=block_length, block_stride=block_stride)
    positions = jnp.arange(LENGTH, dtype=jnp.int32)[None]
    visible = compressed_visibility(positions, starts, tokens, block_length) & (tokens[:, None, :] >= 0)
    expected = np.asarray(visible.sum(-1))[0]
    np.testing.assert_array_equal(
        forward_bounds.visible_compressed_tokens(LENGTH, block_length, block_stride), expected
    )


def test_window_keys_count_the_spec_window():
    window = 40
    t = np.arange(LENGTH)
    expected = [len(range(max(0, p - window + 1), p + 1)) for p in t]
    np.testing.assert_array_equal(forward_bounds.window_keys(LENGTH, window), expected)


def test_selected_keys_count_the_reference_picks():
    """Keys up to ``t`` in the blocks the reference picks on random inputs (n = 5, l' = 32)."""
    geometry = dict(block_length=16, block_stride=8, selection_block_size=32, num_selected=5)
    q_heads, kv_heads, dk = 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 2)
    q = jax.random.normal(keys[0], (1, LENGTH, q_heads, dk), jnp.float32)
    k_cmp = jax.random.normal(keys[1], (1, num_compressed_slots(LENGTH, 8), kv_heads, dk), jnp.float32)
    lse = nsa_jax.compressed_attention(
        q, k_cmp, k_cmp, block_length=16, block_stride=8, implementation="xla"
    )[1]
    picks = nsa_jax.select_blocks(q, k_cmp, lse, **geometry, implementation="xla")
    positions = selected_key_positions(picks, jnp.zeros((1, LENGTH), jnp.int32), 32)
    t = jnp.arange(LENGTH)[None, :, None, None, None]
    attended = (picks[..., None] >= 0) & (positions <= t)
    counts = np.asarray(attended.sum((-1, -2)))[0]  # [T, H]
    expected = forward_bounds.selected_keys(LENGTH, 32, 5)
    for head in range(kv_heads):
        np.testing.assert_array_equal(counts[:, head], expected)
    np.testing.assert_array_equal(
        np.asarray((picks >= 0).sum(-1))[0, :, 0], forward_bounds.selected_blocks(LENGTH, 32, 5)
    )


SELECTION_BLOCK = 32
NUM_BLOCKS = -(-LENGTH // SELECTION_BLOCK)


def _picks_per_position(importance: jax.Array) -> np.ndarray:
    """Blocks the reference's Eq. 11 picks at each position from ``importance [1, T, 1, Nb]``, with
    ``n`` = every block, one initial and two local blocks forced."""
    positions = jnp.arange(LENGTH, dtype=jnp.int32)[None]
    picks = top_blocks(
        importance,
        positions,
        jnp.zeros_like(positions),
        selection_block_size=SELECTION_BLOCK,
        num_selected=NUM_BLOCKS,
        num_initial_blocks=1,
        num_local_blocks=2,
    )
    return np.asarray((picks >= 0).sum(-1))[0, :, 0]


def test_forced_blocks_count_what_eq11_always_selects():
    """With no finite importance the reference picks its forced blocks alone."""
    importance = jnp.full((1, LENGTH, 1, NUM_BLOCKS), -jnp.inf, jnp.float32)
    np.testing.assert_array_equal(
        forward_bounds.forced_blocks(LENGTH, SELECTION_BLOCK), _picks_per_position(importance)
    )


def test_visible_selection_blocks_are_what_top_n_can_pick():
    """With finite importances and n at least the block count, the reference picks every visible block."""
    importance = jax.random.uniform(jax.random.key(1), (1, LENGTH, 1, NUM_BLOCKS))
    np.testing.assert_array_equal(
        forward_bounds.visible_selection_blocks(LENGTH, SELECTION_BLOCK), _picks_per_position(importance)
    )


def test_dense_causal_flops_count_the_causal_pairs():
    length, q_heads, dk, dv = 37, 3, 8, 4
    pairs = int(np.tril(np.ones((length, length), bool)).sum())
    assert forward_bounds.dense_causal_flops(length, q_heads, dk, dv) == 2 * q_heads * (dk + dv) * pairs


def _layer_row(length: int, dk: int, compressed_ms: float, dense_ms: float) -> dict:
    defaults = {
        "compressed_attention": "cudnn",
        "select_blocks": "pallas_triton",
        "selected_attention": "pallas_triton",
        "sliding_window_attention": "cudnn",
    }
    ops = {op: {name: {"fwd_ms": 1.0}} for op, name in defaults.items()}
    ops["compressed_attention"]["cudnn"]["fwd_ms"] = compressed_ms
    return {
        "T": length,
        "Dk": dk,
        "Dv": 128,
        "defaults": defaults,
        "ops": ops,
        "nsa": {"fwd_ms": 4.0},
        "cudnn_dense": {"fwd_ms": 2 * dense_ms},
        "cudnn_dense_native_dv": {"fwd_ms": dense_ms},
    }


def test_bounds_scale_with_the_ceilings_and_the_budget_is_a_sixth_of_dense(tmp_path, monkeypatch, capsys):
    layer = {
        "device": "test",
        "command": "bench_layer.py --parts time",
        "heads": {"q_heads": 64, "kv_heads": 4},
        "time": [_layer_row(65536, 192, compressed_ms=11.0, dense_ms=150.0)],
    }
    path = tmp_path / "layer.json"
    path.write_text(json.dumps(layer))

    def run(*flags):
        argv = ["forward_bounds", "--layer", str(path), "--out", str(tmp_path), *flags]
        monkeypatch.setattr("sys.argv", argv)
        assert forward_bounds.main() == 0
        return json.loads((tmp_path / "forward_bounds.json").read_text())["rows"][0]

    base = run()
    faster = run("--gemm-tflops", str(2 * 788.0))
    assert base["budget_ms"] == pytest.approx(150.0 / 6)
    for branch in ("compressed", "window"):
        assert faster["bounds_device_ms"][branch] == pytest.approx(base["bounds_device_ms"][branch] / 2)
    assert faster["bounds_device_ms"]["selected"] == base["bounds_device_ms"]["selected"]
    # select_blocks takes its faster design: the second pass scales with the flop ceiling, the one
    # pass (importances through HBM) with the HBM ceiling.
    two_passes, one_pass = base["select_designs_ms"]["two_passes"], base["select_designs_ms"]["one_pass"]
    assert faster["select_designs_ms"]["two_passes"] == pytest.approx(two_passes / 2)
    assert faster["select_designs_ms"]["one_pass"] == pytest.approx(one_pass)
    assert base["bounds_device_ms"]["select_blocks"] == pytest.approx(min(two_passes, one_pass))
    assert faster["bounds_device_ms"]["select_blocks"] == pytest.approx(min(two_passes / 2, one_pass))
    # The dense peer's efficiency: its causal flops over its time, as a share of the GEMM ceiling.
    dense_tflops = 2 * 64 * (192 + 128) * 65536 * 65537 / 2 / 150e-3 / 1e12
    assert base["dense_tflops"] == pytest.approx(dense_tflops)
    assert base["dense_efficiency"] == pytest.approx(dense_tflops / 788.0)
    assert base["efficiency_needed"] == pytest.approx(base["sum_device_ms"] / base["budget_ms"])
    assert base["ratio_at_dense_efficiency"] == pytest.approx(
        150.0 * base["dense_efficiency"] / base["sum_device_ms"]
    )
    # At cuDNN's rate the compressed bound is the measured cuDNN compressed time itself.
    assert base["bounds_cudnn_ms"]["compressed"] == pytest.approx(11.0)
    assert base["sum_device_ms"] == pytest.approx(sum(base["bounds_device_ms"].values()))
    assert "| 65536 | 192/128 |" in capsys.readouterr().out


def test_a_report_without_time_rows_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "layer.json"
    path.write_text(json.dumps({"heads": {"q_heads": 8, "kv_heads": 2}}))
    monkeypatch.setattr("sys.argv", ["forward_bounds", "--layer", str(path), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="no 'time' rows"):
        forward_bounds.main()
