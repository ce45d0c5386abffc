"""experiments/selection_rounds.py: its report table and its refusals."""

import pytest

from experiments import selection_rounds


def test_markdown_gives_each_variant_its_medians_and_agreement():
    ms = {"default/fwd": [15.0, 15.4, 15.2], "default/fwd_bwd": [43.0, 44.0, 42.0]}
    ms.update({"forced_merge/fwd": [13.0, 13.1, 12.9], "forced_merge/fwd_bwd": [41.0, 41.5, 40.5]})
    agreement = {
        "default": {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0, "finite": True},
        "forced_merge": {"out": 2.5e-3, "dq": 1.0e-3, "dk": 9.0e-4, "dv": 1.2e-4, "finite": True},
    }
    row = {"config": "G16_D192_128", "ms": ms, "agreement": agreement, "fwd_kernels_ms": {}}
    report = {
        "device": "test",
        "jax": "0",
        "command": "selection_rounds.py",
        "length": 65536,
        "rounds": 3,
        "forced_blocks": True,
        "rows": [row],
    }
    text = selection_rounds.markdown(report)
    assert "block 0 and both local blocks in every one" in text
    assert "| G16_D192_128 | default | 15.20 | 43.00 | 0.0e+00 / 0.0e+00 / 0.0e+00 / 0.0e+00 |" in text
    assert "| G16_D192_128 | forced_merge | 13.00 | 41.00 | 2.5e-03 / 1.0e-03 / 9.0e-04 / 1.2e-04 |" in text


def test_main_refuses_unknown_variants_and_needs_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["selection_rounds", "--out", str(tmp_path), "--variants", "nope"])
    with pytest.raises(SystemExit) as refused:
        selection_rounds.main()
    assert refused.value.code == 2
    if selection_rounds.ON_GPU:
        pytest.skip("runs the benchmark on a GPU")
    monkeypatch.setattr("sys.argv", ["selection_rounds", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs a GPU"):
        selection_rounds.main()
