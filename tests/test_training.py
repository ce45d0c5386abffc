"""The training side: synthetic tasks, sharded steps, checkpoint resume, evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import evaluate, tasks, train
from experiments.model import ModelConfig
from nsa_jax import NSAConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> train.TrainConfig:
    nsa = NSAConfig(
        model_dim=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim_qk=8,
        head_dim_v=8,
        block_length=8,
        block_stride=4,
        selection_block_size=16,
        num_selected=3,
        window=16,
    )
    config = train.TrainConfig(
        model=ModelConfig(model_dim=32, mlp_dim=64, num_layers=1, nsa=nsa),
        seq_len=96,
        batch_size=8,
        steps=6,
        warmup_steps=2,
        eval_every=1000,
        eval_batches=1,
        eval_lengths=(96,),
        eval_depths=(0.5,),
        eval_examples=2,
        checkpoint_every=3,
        corpus_bytes=200_000,
    )
    return dataclasses.replace(config, **changes)


def test_passkey_example_places_needle_and_scores_only_the_key():
    filler = np.frombuffer(b"abcdefghij" * 100, np.uint8)
    example = tasks.passkey_example(np.random.default_rng(0), filler, 200, 0.5)
    tokens, mask = example["tokens"], example["mask"]
    assert tokens.shape == (201,) and mask.shape == (200,)
    text = bytes(tokens.astype(np.uint8))
    key = text[-tasks.PASSKEY_DIGITS :]
    assert key.isdigit()
    needle = text.index(b" The pass key is " + key)
    tail = len(b" What is the pass key? The pass key is ") + len(key)
    filler_len = len(text) - len(b" The pass key is 00000. Remember it. ") - tail
    assert abs(needle - 0.5 * filler_len) <= 1
    assert bytes(tokens[1:][mask > 0].astype(np.uint8)) == key
    with pytest.raises(ValueError, match="depth must lie in"):
        tasks.passkey_example(np.random.default_rng(0), filler, 200, 1.5)
    with pytest.raises(ValueError, match="length must be at least"):
        tasks.passkey_example(np.random.default_rng(0), filler, 20, 0.5)


def test_mqar_targets_are_the_values_of_the_queried_keys():
    example = tasks.mqar_example(np.random.default_rng(1), 100, 8, 4)
    text = bytes(example["tokens"].astype(np.uint8))
    pairs = dict(item.split("=") for item in text[: 8 * 4].decode().strip(";").split(";"))
    scored = bytes(example["tokens"][1:][example["mask"] > 0].astype(np.uint8)).decode()
    queries = text.decode().split()[-1]
    asked = [queries[i] for i in range(0, len(queries), 3)]
    assert scored == "".join(pairs[k] for k in asked)


def test_retrieval_accuracy_of_an_oracle_is_one():
    filler = np.frombuffer(b"lorem ipsum " * 200, np.uint8)

    def oracle_logits(tokens):  # knows the key: reads it from the needle
        rows = []
        for row in np.asarray(tokens):
            text = bytes(row.astype(np.uint8))
            start = text.index(b"The pass key is ") + len(b"The pass key is ")
            key = text[start : start + tasks.PASSKEY_DIGITS]
            logits = np.zeros((len(row), 256), np.float32)
            # Position p predicts token p + 1: the last five positions predict the key.
            logits[np.arange(len(row) - tasks.PASSKEY_DIGITS, len(row)), list(key)] = 1.0
            rows.append(logits)
        return jnp.asarray(np.stack(rows))

    grid = evaluate.retrieval_accuracy(
        oracle_logits, filler, lengths=(120, 200), depths=(0.0, 1.0), examples=3, seed=0
    )
    np.testing.assert_array_equal(grid, np.ones((2, 2)))


def test_checkpoint_resume_reproduces_the_loss_sequence(tmp_path):
    config = tiny_config()
    straight = train.train(config, tmp_path / "straight", progress=False)
    train.train(config, tmp_path / "resumed", progress=False, stop_after=3)
    resumed = train.train(config, tmp_path / "resumed", progress=False, resume=True)
    assert len(resumed["losses"]) == 6
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-6)
    assert (tmp_path / "straight" / "retrieval.png").stat().st_size > 0


def test_gradient_accumulation_matches_the_full_batch():
    full = train.Trainer(tiny_config())
    accumulated = train.Trainer(tiny_config(grad_accum=4))
    batch = next(train._batches(tiny_config(), np.frombuffer(b"some text to learn from " * 100, np.uint8), 0))
    np.testing.assert_allclose(accumulated.step(*batch), full.step(*batch), rtol=1e-5)
    logits = np.asarray(full.logits(jnp.asarray(batch[0][:, :-1])))
    np.testing.assert_allclose(
        np.asarray(accumulated.logits(jnp.asarray(batch[0][:, :-1]))), logits, atol=1e-4
    )


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from tests.test_training import tiny_config
    from experiments import train
    assert jax.device_count() == 8
    out = {{}}
    for name, mesh in (("one", (1, 1, 1)), ("sharded", (2, 2, 2))):
        trainer = train.Trainer(tiny_config(mesh=mesh))
        batches = train._batches(tiny_config(), np.frombuffer(b"abc def ghi " * 500, np.uint8), 0)
        losses = [trainer.step(*next(batches)) for _ in range(3)]
        probe = next(batches)[0][:, :-1]
        leaves = jax.tree.leaves(trainer.state)
        out[name] = {{"losses": losses, "logits": np.asarray(trainer.logits(probe))[:, -4:].tolist(),
                      "devices": sorted({{len(x.sharding.device_set) for x in leaves}})}}
        with jax.set_mesh(trainer.mesh):
            step = jax.make_jaxpr(trainer._train_step)(trainer.state, *next(batches))
        out[name]["shard_maps"] = str(step).count("shard_map")
    print(json.dumps(out))
    """
)


def test_sharded_step_on_8_simulated_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT.format(root=str(ROOT))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["sharded"]["devices"] == [8] and out["one"]["devices"] == [1]
    # The attention runs per shard (forward, and its transpose in the backward).
    assert out["sharded"]["shard_maps"] >= 2
    np.testing.assert_allclose(out["sharded"]["losses"], out["one"]["losses"], rtol=1e-5)
    # After three AdamW steps the two models predict the same (Adam's update of a
    # parameter whose gradient is ~0 can differ in sign between reduction orders, so
    # parameters themselves are compared through what they compute).
    np.testing.assert_allclose(out["sharded"]["logits"], out["one"]["logits"], rtol=1e-3, atol=1e-3)


def test_bad_training_config_raises():
    with pytest.raises(ValueError, match=r"batch_size .* must be divisible by grad_accum"):
        tiny_config(grad_accum=3)
    with pytest.raises(ValueError, match="seq_len must be at least 80"):
        tiny_config(seq_len=64)
    with pytest.raises(ValueError, match="task_fraction must lie in"):
        tiny_config(task_fraction=1.5)
    with pytest.raises(ValueError, match=r"mesh .* needs 64 devices"):
        train.make_mesh((4, 4, 4))


def test_ablation_report_covers_every_variant(tmp_path):
    from experiments import ablate

    base = tiny_config(steps=3, checkpoint_every=1000)
    # Two variants run (each one compiles a model); a FIELD=VALUE variant is checked as a config.
    summaries = ablate.ablate(base, ["full", "no_window"], tmp_path, command="test", progress=False)
    assert list(summaries) == ["full", "no_window"]
    report = (tmp_path / "report.md").read_text()
    for name in summaries:
        assert f"| {name} |" in report
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "retrieval.png").stat().st_size > 0
    assert ablate.variant_config(base, "no_window").model.nsa.branches == ("compressed", "selected")
    assert ablate.variant_config(base, "num_selected=4").model.nsa.num_selected == 4
    with pytest.raises(ValueError, match="is not an NSAConfig field"):
        ablate.variant_config(base, "nonsense=3")
    with pytest.raises(ValueError, match="variant must be one of"):
        ablate.variant_config(base, "bogus")


def test_scaling_report_measures_efficiency_and_loss_agreement():
    from experiments import scaling

    def summary(tokens_per_s, losses, peaks):
        return {
            "backend": "gpu",
            "steps": len(losses),
            "tokens_per_s": tokens_per_s,
            "losses": losses,
            "final_loss": losses[-1],
            "peak_memory_bytes_per_device": peaks,
        }

    meshes = [(1, 1, 1), (2, 1, 1)]
    # The losses part only at step 12, after the early window of 10 steps.
    same, late = [3.0] * 11 + [2.0], [3.0] * 11 + [2.5]
    summaries = [summary(1000.0, same, [2**30]), summary(1500.0, late, [2**29, 2**29])]
    text = scaling.report(meshes, summaries, "cmd")
    assert "| (2, 1, 1) | 2 | 1500 | 0.75 | 0.50, 0.50 | 0.00e+00 / 5.00e-01 | 2.500 |" in text
    with pytest.raises(ValueError, match="--mesh sizes must be positive"):
        scaling.main(["--mesh", "0", "1", "1", "--out", "/tmp/unused-scaling"])


def test_timeline_totals_split_kernels_by_owner(capsys):
    # experiments.measure.print_timeline, which the profile scripts report with: span from the
    # first start to the last end, kernels summed per owner, gaps over 5 us counted.
    from experiments.measure import kernel_kind, print_timeline

    events = [
        {"start_us": 0.0, "duration_us": 10.0, "gap_us": 0.0, "name": "nsa_selected_fwd"},
        {"start_us": 12.0, "duration_us": 4.0, "gap_us": 2.0, "name": "cudnn_generated_fort_native_sdpa"},
        {"start_us": 26.0, "duration_us": 3.0, "gap_us": 10.0, "name": "loop_add_fusion"},
        {"start_us": 29.0, "duration_us": 1.0, "gap_us": 0.0, "name": "void cudnn::fusion::fmha_reduce_head"},
    ]
    assert [kernel_kind(e["name"]) for e in events] == ["nsa", "cudnn", "xla", "cudnn"]
    totals = print_timeline(events, min_us=3.5)
    assert totals["span_us"] == 30.0 and totals["busy_us"] == 18.0
    assert totals["by_kind_us"] == {"nsa": 10.0, "cudnn": 5.0, "xla": 3.0}
    assert (totals["large_gaps"], totals["large_gaps_us"]) == (1, 10.0)
    listed = capsys.readouterr().out
    assert "nsa_selected_fwd" in listed and "fmha_reduce_head" not in listed
    assert print_timeline([], min_us=0.0) == {}
