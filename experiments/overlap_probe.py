"""Would the op's forward branches gain from running at the same time on one GPU?

    PYTHONPATH=$PWD python3 experiments/overlap_probe.py --out $OUT --mps --sm-percent 100 50 --dk 192  # GPU

The op's forward runs its four kernels one after another: the compressed branch (cuDNN), the
block scores and top-n (``select_blocks``), the selected branch, the window (cuDNN). They lean
on different parts of the chip (ncu, session 16: ``select_blocks`` on issue slots and the
exp unit, the selected forward on L2 bandwidth), so running two at once could beat running
them in turn. This script measures that with one process per branch on a shared wall-clock
schedule of phases: each phase runs one branch alone or two at once, each process calling
its jitted branch op in a loop (B=1, T=``--length``, paper geometry, HQ=64, H=4, bf16,
the branch's default implementation, inputs as ``bench_layer.py``'s).

Without ``--mps`` the processes share the GPU by time slicing. With ``--mps`` the script starts
the CUDA MPS control daemon for the run (and stops it after), so that kernels of two processes
can run at once; each ``--sm-percent`` value is a run with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
set for the clients (50: each process gets half the SMs).

For each phase of two branches it reports each branch's time a call and its *share*: its
time a call when it runs alone on the whole GPU (the phases of one branch in the first run,
which shares the GPU by time slicing) over its time a call in the phase. A sum of shares
above 1 means the pair did more work together than in turn. Writes ``overlap.json`` and ``overlap.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Branch role -> its letter in a phase name.
ROLES = {"select": "S", "selected": "Q", "compressed": "C", "window": "W"}
PHASES = ("S", "Q", "C", "W", "SQ", "CQ", "WQ", "SC", "SW", "SQ", "Q", "S")
# The first part of a phase is not timed: the other process starts its loop then too.
PHASE_WARMUP_S = 0.5


def build(role: str, length: int, dk: int, dv: int):
    """``(jitted branch op, its arguments)``; block indices and lse come from the earlier branches."""
    import jax

    import nsa_jax
    from experiments.bench_layer import PAPER, add_branch_inputs, branch_fns, defaults, op_inputs

    x = op_inputs(length, dk, dv, PAPER)
    if role == "compressed":  # with its lse, as nsa_attention calls it (branch_fns times the output alone)
        compressed_kw = {k: PAPER[k] for k in ("block_length", "block_stride")}
        compressed = jax.jit(lambda q, k, v: nsa_jax.compressed_attention(q, k, v, **compressed_kw))
        return compressed, (x["q"], x["k_cmp"], x["v_cmp"])
    if role == "window":  # needs no earlier branch's output
        window = jax.jit(lambda q, k, v: nsa_jax.sliding_window_attention(q, k, v, window=PAPER["window"]))
        return window, (x["q"], x["k_win"], x["v_win"])
    implementations = defaults(x, PAPER)
    add_branch_inputs(x, implementations)
    op = {"select": "select_blocks", "selected": "selected_attention"}[role]
    make, args, _ = branch_fns(x, PAPER)[op]
    return jax.jit(make(implementations[op])), args


def run_role(role: str, t0: float, phase_s: float, length: int, dk: int, dv: int) -> dict:
    """One branch's process: calls its op through every phase that names it; ms a call per phase."""
    import jax

    fn, args = build(role, length, dk, dv)
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    call_s = time.perf_counter() - start
    if time.time() > t0:
        raise RuntimeError(
            f"{role}: ready {time.time() - t0:.1f} s after the first phase began, so its phases would not "
            "line up with the other processes'; give a longer --lead-s"
        )
    rows = []
    for i, phase in enumerate(PHASES):
        begin, end = t0 + i * phase_s, t0 + (i + 1) * phase_s
        time.sleep(max(0.0, begin - time.time()))
        if ROLES[role] not in phase:
            continue
        while time.time() < begin + PHASE_WARMUP_S:
            jax.block_until_ready(fn(*args))
        calls, busy = 0, 0.0
        while time.time() + call_s < end - 0.2:
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            busy += time.perf_counter() - start
            calls += 1
        if not calls:
            raise RuntimeError(f"{role}: no call fits in phase {phase}; give a longer --phase-s")
        rows.append({"phase": i, "name": phase, "calls": calls, "ms_per_call": 1e3 * busy / calls})
    return {"role": role, "phases": rows}


def run_schedule(args, env: dict) -> dict[str, dict]:
    """Every role in its own process on one schedule; their reports by role."""
    t0 = time.time() + args.lead_s
    folder = pathlib.Path(tempfile.mkdtemp())
    procs = {
        role: subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                role,
                "--t0",
                str(t0),
                "--phase-s",
                str(args.phase_s),
                "--length",
                str(args.length),
                "--dk",
                str(args.dk),
                "--dv",
                str(args.dv),
                "--out",
                str(folder),
            ],
            env=env,
        )
        for role in ROLES
    }
    for role, proc in procs.items():
        if proc.wait() != 0:
            for other in procs.values():
                other.kill()
            raise RuntimeError(f"the {role} process failed (exit {proc.returncode})")
    return {role: json.loads((folder / f"{role}.json").read_text()) for role in ROLES}


def shares(reports: dict[str, dict], alone_ms: dict[str, float]) -> list[dict]:
    """Per phase of two branches: each branch's ms a call, its share, and the sum of shares."""
    by_phase: dict[tuple[int, str], dict] = {}
    for role, report in reports.items():
        for row in report["phases"]:
            if len(row["name"]) > 1:
                entry = by_phase.setdefault(
                    (row["phase"], row["name"]), {"phase": row["name"], "branches": {}}
                )
                entry["branches"][role] = {
                    "ms_per_call": row["ms_per_call"],
                    "share": alone_ms[role] / row["ms_per_call"],
                }
    out = [by_phase[key] for key in sorted(by_phase)]
    for entry in out:
        entry["sum_of_shares"] = sum(b["share"] for b in entry["branches"].values())
    return out


def alone(reports: dict[str, dict]) -> dict[str, float]:
    """Each branch's fastest ms a call over the phases where it ran alone."""
    return {
        role: min(row["ms_per_call"] for row in report["phases"] if len(row["name"]) == 1)
        for role, report in reports.items()
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Branches at the same time (T={report['length']}, Dk={report['dk']}/Dv={report['dv']},"
        f" {report['device']})",
        "",
        f"Command: `{report['command']}`. Alone, whole GPU, ms a call: "
        + ", ".join(f"{role} {ms:.2f}" for role, ms in report["alone_ms"].items())
        + ".",
        "",
        "| run | phase | ms a call (share of alone) | sum of shares |",
        "|---|---|---|---|",
    ]
    for run in report["runs"]:
        halves = ", ".join(f"{role} {ms:.2f}" for role, ms in run["alone_ms"].items())
        lines.append(f"| {run['name']} | each alone | {halves} | - |")
        for entry in run["pairs"]:
            cells = "; ".join(
                f"{role} {b['ms_per_call']:.2f} ({b['share']:.2f})" for role, b in entry["branches"].items()
            )
            lines.append(f"| {run['name']} | {entry['phase']} | {cells} | {entry['sum_of_shares']:.2f} |")
    return "\n".join(lines) + "\n"


def mps_daemon(start: bool, env: dict) -> None:
    command = ["nvidia-cuda-mps-control"] + (["-d"] if start else [])
    subprocess.run(command, input=None if start else b"quit\n", env=env, check=True)


def launch(args) -> int:
    import jax

    from experiments.measure import write_report

    runs = []
    env = dict(os.environ)
    runs.append(("time slicing", run_schedule(args, env)))
    if args.mps:
        folder = tempfile.mkdtemp()
        env.update(CUDA_MPS_PIPE_DIRECTORY=f"{folder}/pipe", CUDA_MPS_LOG_DIRECTORY=f"{folder}/log")
        os.makedirs(env["CUDA_MPS_PIPE_DIRECTORY"])
        os.makedirs(env["CUDA_MPS_LOG_DIRECTORY"])
        mps_daemon(True, env)
        try:
            for percent in args.sm_percent:
                runs.append(
                    (
                        f"MPS, {percent}% of SMs each",
                        run_schedule(args, {**env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percent)}),
                    )
                )
        finally:
            mps_daemon(False, env)
    whole_gpu = alone(runs[0][1])
    report = {
        "command": " ".join(["python3", "experiments/overlap_probe.py", *sys.argv[1:]]),
        "device": jax.devices()[0].device_kind,
        "length": args.length,
        "dk": args.dk,
        "dv": args.dv,
        "alone_ms": whole_gpu,
        "runs": [
            {
                "name": name,
                "alone_ms": alone(reports),
                "pairs": shares(reports, whole_gpu),
                "reports": reports,
            }
            for name, reports in runs
        ],
    }
    write_report(args.out, "overlap", report, markdown(report))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for overlap.json/.md (a role process: its JSON)")
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--dk", type=int, default=192)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--phase-s", type=float, default=5.0, help="seconds a phase")
    parser.add_argument(
        "--lead-s", type=float, default=80.0, help="seconds from launch to the first phase (inputs, compiles)"
    )
    parser.add_argument("--mps", action="store_true", help="also run under CUDA MPS")
    parser.add_argument(
        "--sm-percent", type=int, nargs="+", default=[100], help="MPS runs: SMs a process, %%"
    )
    parser.add_argument("--role", choices=list(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase_s <= 2 * PHASE_WARMUP_S:
        raise ValueError(f"--phase-s must exceed {2 * PHASE_WARMUP_S} s, got {args.phase_s}")
    if any(not 0 < p <= 100 for p in args.sm_percent):
        raise ValueError(f"--sm-percent values must be in (0, 100], got {args.sm_percent}")
    if args.role is None:
        return launch(args)
    report = run_role(args.role, args.t0, args.phase_s, args.length, args.dk, args.dv)
    (pathlib.Path(args.out) / f"{args.role}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
