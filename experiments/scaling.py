"""Multi-device scaling of the training loop: the same model and global batch on 1 and N devices.

    python -m experiments.scaling --preset gpu --steps 60 --mesh 1 1 1 --mesh 2 1 1 --mesh 1 2 1 \\
        --out experiments/results/scaling_h200x2

Each mesh ``(data, fsdp, tensor)`` runs ``experiments.train`` in its own process on
the first ``data * fsdp * tensor`` devices (``CUDA_VISIBLE_DEVICES`` on GPU; on CPU,
``--xla_force_host_platform_device_count`` simulates them). The first mesh is the
baseline. Writes ``scaling.json``, ``scaling.md`` (tokens/s, scaling efficiency
against the baseline, peak memory per device, largest loss difference from the
baseline) and ``loss.png`` (the curves overlaid) into ``--out``.

Same global batch and data order on every mesh, so the losses agree up to the
reduction order of float arithmetic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np

# Steps over which the losses of different meshes still agree to rounding (bf16 reduction
# orders differ; later the trajectories drift apart within the step-to-step noise).
_EARLY = 10


def _device_env(devices: int, platform: str) -> dict[str, str]:
    env = dict(os.environ)
    if platform == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
    else:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def run_mesh(mesh: tuple[int, int, int], args: argparse.Namespace) -> dict:
    """Trains on ``mesh`` in a subprocess; returns its ``summary.json``."""
    out = args.out / ("mesh_" + "x".join(map(str, mesh)))
    command = [
        sys.executable,
        "-m",
        "experiments.train",
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--mesh",
        *map(str, mesh),
        "--out",
        str(out),
    ]
    subprocess.run(command, env=_device_env(math.prod(mesh), args.platform), check=True)
    return json.loads((out / "summary.json").read_text())


def report(meshes: list[tuple[int, int, int]], summaries: list[dict], command: str) -> str:
    base = summaries[0]
    lines = [
        f"# Training-loop scaling ({base['backend']}, preset with {base['steps']} steps)",
        "",
        f"Command: `{command}`",
        "",
        "| mesh (data, fsdp, tensor) | devices | tokens/s | scaling efficiency "
        f"| peak memory per device (GiB) | max loss difference vs first row, steps 1-{_EARLY} / all "
        "| final loss (mean of last 10) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mesh, s in zip(meshes, summaries, strict=True):
        devices = math.prod(mesh)
        efficiency = s["tokens_per_s"] / (devices * base["tokens_per_s"] / math.prod(meshes[0]))
        peaks = s["peak_memory_bytes_per_device"]
        memory = "-" if peaks is None else ", ".join(f"{p / 2**30:.2f}" for p in peaks)
        difference = np.abs(np.subtract(s["losses"], base["losses"]))
        lines.append(
            f"| {mesh} | {devices} | {s['tokens_per_s']:.0f} | {efficiency:.2f} | {memory} "
            f"| {np.max(difference[:_EARLY]):.2e} / {np.max(difference):.2e} | {s['final_loss']:.3f} |"
        )
    lines += ["", "![loss](loss.png)", ""]
    return "\n".join(lines)


def plot(meshes: list[tuple[int, int, int]], summaries: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mesh, s in zip(meshes, summaries, strict=True):
        ax.plot(s["losses"], label=f"mesh {mesh}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--mesh",
        type=int,
        nargs=3,
        action="append",
        metavar=("DATA", "FSDP", "TENSOR"),
        help="a mesh to run (repeatable; the first is the baseline)",
    )
    parser.add_argument("--platform", choices=["gpu", "cpu"], default="cpu")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/scaling"))
    args = parser.parse_args(argv)
    meshes = [tuple(m) for m in (args.mesh or [[1, 1, 1], [2, 1, 1]])]
    for mesh in meshes:
        if min(mesh) < 1:
            raise ValueError(f"--mesh sizes must be positive, got {mesh}")
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = [run_mesh(mesh, args) for mesh in meshes]
    command = "python -m experiments.scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "scaling.json").write_text(
        json.dumps([{"mesh": m, **s} for m, s in zip(meshes, summaries, strict=True)], indent=2)
    )
    plot(meshes, summaries, args.out / "loss.png")
    text = report(meshes, summaries, command)
    (args.out / "scaling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
