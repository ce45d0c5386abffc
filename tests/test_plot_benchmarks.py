"""experiments/plot_benchmarks.py draws the benchmark JSON layouts its two scripts write."""

import json

import pytest

from experiments import plot_benchmarks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _times(fwd: float) -> dict[str, float]:
    return {"fwd_ms": fwd, "fwd_bwd_ms": 2.7 * fwd}


def _layer_report() -> dict:
    """bench_layer.py's ``time`` rows, as in experiments/results/layer_session17_h200.json."""
    defaults = {
        "compressed_attention": "cudnn",
        "select_blocks": "pallas_triton",
        "selected_attention": "pallas_triton",
        "sliding_window_attention": "cudnn",
    }
    rows = []
    for dk in (192, 128):
        for tokens, scale in ((8192, 1.0), (32768, 4.3)):
            ops = {op: {name: _times(0.7 * scale + dk / 400)} for op, name in defaults.items()}
            ops["select_blocks"] = {"pallas_triton": {"fwd_ms": 0.6 * scale}}
            rows.append(
                {
                    "Dk": dk,
                    "Dv": 128,
                    "T": tokens,
                    "nsa": _times(3.1 * scale),
                    "cudnn_dense": _times(2.2 * scale**2),
                    "cudnn_dense_native_dv": _times(2.0 * scale**2),
                    "defaults": defaults,
                    "ops": ops,
                    "combine": _times(0.2 * scale),
                }
            )
    return {"device": "NVIDIA H200", "jax": "0.11.2", "heads": {"q_heads": 64, "kv_heads": 4}, "time": rows}


def _decode_report() -> dict:
    """bench_decode.py's rows, as in experiments/results/decode_session17_h200.json."""
    rows = []
    for batch in (16, 1):
        for length in (8192, 65536):
            row = {
                "B": batch,
                "S": length,
                "dense_bytes": 2 * batch * length * 4 * 128 * 2,
                "dense_cudnn_ms": 1e-5 * batch * length / 16,
                "dense_xla_ms": 1.7e-5 * batch * length / 16,
            }
            for dk in (192, 128):
                row[f"nsa_dk{dk}_dv128_new_ms"] = 0.02 + 1e-6 * batch * length / 16
                row[f"nsa_dk{dk}_dv128_bytes"] = row["dense_bytes"] // 11
            # The dense step with NSA's head dims where they are not 128/128.
            row["dense_cudnn_dk192_dv128_bytes"] = batch * length * 4 * 320 * 2
            row["dense_cudnn_dk192_dv128_ms"] = 1.25e-5 * batch * length / 16
            rows.append(row)
    return {"device": "NVIDIA H200", "jax": "0.11.2", "rows": rows, "tune": []}


def test_plots_are_written_from_both_reports(tmp_path):
    (tmp_path / "layer.json").write_text(json.dumps(_layer_report()))
    (tmp_path / "decode_gpu.json").write_text(json.dumps(_decode_report()))
    written = plot_benchmarks.main(
        [
            "--layer",
            str(tmp_path / "layer.json"),
            "--decode",
            str(tmp_path / "decode_gpu.json"),
            "--out",
            str(tmp_path / "plots"),
        ]
    )
    assert [path.name for path in written] == ["op_h200.png", "decode_h200.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 20_000  # axes, curves and labels, not an empty canvas


@pytest.mark.parametrize(
    ("plot", "argument"), [(plot_benchmarks.plot_op, "--layer"), (plot_benchmarks.plot_decode, "--decode")]
)
def test_a_report_without_its_rows_is_refused(tmp_path, plot, argument):
    with pytest.raises(ValueError, match=argument):
        plot({"device": "NVIDIA H200"}, tmp_path / "out.png")


def test_the_command_needs_a_report():
    with pytest.raises(SystemExit):
        plot_benchmarks.main([])
