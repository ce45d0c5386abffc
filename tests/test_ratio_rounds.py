"""experiments/ratio_rounds.py and measure.alternating_rounds: the round order and the ratios."""

import jax.numpy as jnp
import pytest

from experiments import ratio_rounds
from experiments.measure import alternating_rounds
from experiments.selection_inputs import VARIANTS
from nsa_jax import registry


def test_rounds_alternate_the_order_and_time_every_call_each_round():
    log = []

    def recorder(name):
        def fn(x):
            log.append(name)
            return x + 1

        return fn

    calls = {name: (recorder(name), (jnp.ones(3),)) for name in "ABC"}
    times = alternating_rounds(calls, rounds=3, iters=2)
    assert {name: len(values) for name, values in times.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(t >= 0 for values in times.values() for t in values)

    # One compiling call each, then per round each name's 1 warm-up + 2 timed calls, in turn.
    def round_of(order):
        return [name for name in order for _ in range(3)]

    assert log == list("ABC") + round_of("ABC") + round_of("CBA") + round_of("ABC")


@pytest.mark.parametrize("rounds, iters", [(0, 3), (2, 0)])
def test_rounds_and_iters_must_be_positive(rounds, iters):
    with pytest.raises(ValueError, match="rounds and iters must be >= 1"):
        alternating_rounds({"A": (lambda: jnp.ones(1), ())}, rounds=rounds, iters=iters)


def test_ratio_summary_takes_each_round_alone():
    summary = ratio_rounds.ratio_summary([500.0, 630.0, 600.0], [100.0, 125.0, 125.0])
    assert summary["rounds"] == pytest.approx([5.0, 5.04, 4.8])
    assert summary["median"] == pytest.approx(5.0)
    assert (summary["low"], summary["high"]) == (pytest.approx(4.8), pytest.approx(5.04))
    with pytest.raises(ValueError, match="one time of each per round"):
        ratio_rounds.ratio_summary([1.0], [1.0, 2.0])


def test_markdown_gives_median_and_spread():
    row = {
        "T": 65536,
        "Dk": 192,
        "Dv": 128,
        "ms": {"nsa_fwd": [47.0, 48.0], "nsa_fwd_bwd": [125.0, 126.0], "dense_fwd": [150.0, 150.0]},
    }
    row["ms"]["dense_fwd_bwd"] = [630.0, 620.0]
    for mode in ratio_rounds.MODES:
        row[f"{mode}_ratios"] = ratio_rounds.ratio_summary(
            row["ms"][f"dense_{mode}"], row["ms"][f"nsa_{mode}"]
        )
    report = {"device": "test", "jax": "0", "command": "ratio_rounds.py", "rounds": 2, "rows": [row]}
    text = ratio_rounds.markdown(report)
    assert (
        "| 65536 | 192/128 | 47.50 / 125.50 | 150.00 / 625.00 | 3.16x (3.12-3.19) | 4.98x (4.92-5.04) |"
        in text
    )


def test_main_needs_a_gpu(tmp_path, monkeypatch):
    if ratio_rounds.ON_GPU:
        pytest.skip("runs the benchmark on a GPU")
    monkeypatch.setattr("sys.argv", ["ratio_rounds", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs a GPU"):
        ratio_rounds.main()


def test_markdown_lists_each_selection_variant_against_the_same_peer():
    ms = {"nsa_fwd": [47.0], "nsa_fwd_bwd": [125.0], "dense_fwd": [150.0], "dense_fwd_bwd": [625.0]}
    ms.update({"nsa[forced_merge]_fwd": [45.0], "nsa[forced_merge]_fwd_bwd": [120.0]})
    row = {"T": 65536, "Dk": 192, "Dv": 128, "ms": ms, "ops": ["nsa", "nsa[forced_merge]"]}
    for label, prefix in (("nsa", ""), ("nsa[forced_merge]", "nsa[forced_merge]_")):
        for mode in ratio_rounds.MODES:
            row[f"{prefix}{mode}_ratios"] = ratio_rounds.ratio_summary(
                ms[f"dense_{mode}"], ms[f"{label}_{mode}"]
            )
    report = {"device": "test", "jax": "0", "command": "ratio_rounds.py", "rounds": 1, "rows": [row]}
    text = ratio_rounds.markdown(report)
    assert (
        "| 65536 | 192/128 | 47.00 / 125.00 | 150.00 / 625.00 | 3.19x (3.19-3.19) | 5.00x (5.00-5.00) |"
        in text
    )
    assert (
        "| 65536 | 192/128 forced_merge | 45.00 / 120.00 | 150.00 / 625.00 | 3.33x (3.33-3.33) "
        "| 5.21x (5.21-5.21) |" in text
    )


def test_variant_op_registers_the_variant_tuning():
    op = ratio_rounds.variant_op("forced_merge", 192)
    assert callable(op)
    impl = registry.get("selected_attention", "pallas_triton[forced_merge,dk=192]")
    tuning = impl.fn.keywords["tuning"]
    assert tuning.forced_merge and tuning == VARIANTS["G16_D192_128"]["forced_merge"]
    with pytest.raises(ValueError, match="no variant 'nope' for Dk=128"):
        ratio_rounds.variant_op("nope", 128)


def test_markdown_adds_flash_attention_2_rows_only_where_timed():
    ms = {"nsa_fwd": [40.0, 42.0], "nsa_fwd_bwd": [120.0, 121.0], "dense_fwd": [150.0, 151.0]}
    ms.update({"dense_fwd_bwd": [615.0, 614.0], "fa2_fwd": [336.0, 340.0]})
    row = {"T": 65536, "Dk": 192, "Dv": 128, "ms": ms}
    for mode in ratio_rounds.MODES:
        row[f"{mode}_ratios"] = ratio_rounds.ratio_summary(ms[f"dense_{mode}"], ms[f"nsa_{mode}"])
    plain = {"device": "test", "jax": "0", "command": "ratio_rounds.py", "rounds": 2, "rows": [dict(row)]}
    assert "FlashAttention-2" not in ratio_rounds.markdown(plain)
    row["fa2_fwd_ratios"] = ratio_rounds.ratio_summary(ms["fa2_fwd"], ms["nsa_fwd"])
    text = ratio_rounds.markdown(dict(plain, rows=[row]))
    assert "| 65536 | 192/128 | 41.00 | 338.00 | 8.25x (8.10-8.40) |" in text
