"""Registers, spills and shared memory of the Pallas (Triton) kernels, measured without a GPU.

Lowers a function for CUDA on this (CPU) machine, captures every Pallas Triton
module it contains, compiles each with the ``triton`` package for sm_90a (the H200)
under the kernel's own ``num_warps``/``num_stages``, and runs ``ptxas -v`` on the PTX.
A kernel whose ``ptxas`` report shows a stack frame spills registers to local memory:
check this before spending device time on a kernel change.

Needs ``pip install triton`` (the GPU extra's compiler; a CPU install works). The Triton
lowering and the compiler here are this machine's jax and triton, not the H200's
jax 0.11.2, so treat the numbers as close leads, not as the H200's exact build. How far
they can be off (session 24, select_blocks at T = 64K, Dk = 192, ncu on the H200 against
triton 3.9 here): the default tuning takes 232 registers there against 214 here, with a hot
loop of 591 against 611 instructions, close; a variant that reshapes the wgmma accumulator
more (``row_shift``, branch ``session24-shift-rows``) takes 252 registers there against 162
here, and where its loop here had a quarter fewer instructions than the default's, it executed
7% more than the default there (6.50 G against 6.05 G) and ran 40% slower
(experiments/results/session24_h200.md). Changes that move data between layouts need an H200
run before they are judged.

The target is an H200, so the selection's Mosaic GPU paths, which need a Hopper GPU, are taken as
on the H200 (their own kernels are Mosaic GPU, not Triton, and are not compiled here).

Usage::

    python -m experiments.kernel_resources                 # the shipped kernels, paper shapes
    python -m experiments.kernel_resources --dk 192 --dv 128
    python -m experiments.kernel_resources --dk 192 --dv 128 --variant forced_merge  # a VARIANTS tuning
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KernelResources:
    name: str
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0


def lower_for_h200(fn: Callable, *args) -> str:
    """The StableHLO text of ``fn(*args)`` lowered for CUDA with an H200 as the (abstract) device:
    Pallas Triton and Mosaic GPU kernels lower to their IR without a GPU on this machine."""
    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h200)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def capture_triton_modules(fn: Callable, *args) -> list[tuple[str, int, int, str]]:
    """``(name, num_warps, num_stages, ttir)`` of every Pallas Triton call in ``fn(*args)``."""
    from jax._src.pallas.triton import lowering

    modules: list[str] = []
    original_lower = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original_lower(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        text = lower_for_h200(fn, *args)
    finally:
        lowering.lower_jaxpr_to_triton_module = original_lower
    launches = re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    if len(launches) != len(modules):
        raise RuntimeError(f"found {len(launches)} Triton launches but captured {len(modules)} modules")
    return [
        (name, int(warps), int(stages), ttir)
        for (name, stages, warps), ttir in zip(launches, modules, strict=True)
    ]


def kernel_resources(fn: Callable, *args) -> list[KernelResources]:
    """Compiles every Pallas Triton kernel of ``fn(*args)`` for sm_90a and reads ``ptxas -v``."""
    import triton
    import triton.backends.nvidia.compiler as nvidia_compiler
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)

    # The ptxas triton itself runs for sm_90: the PTX it emits may be newer than the legacy ptxas it ships.
    ptxas = nvidia_compiler.get_ptxas(target.arch).path
    reports = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, warps, stages, ttir) in enumerate(capture_triton_modules(fn, *args)):
            options = dict(num_warps=warps, num_stages=stages)
            raw = os.path.join(scratch, f"kernel{index}.raw.ttir")
            with open(raw, "w") as f:
                f.write(ttir)
            # triton.compile skips the TTIR passes for an IR file; XLA runs them, so run them here.
            context = ir.context()
            ir.load_dialects(context)
            backend.load_dialects(context)
            module = ir.parse_mlir_module(raw, context)
            module.context = context
            module = backend.make_ttir(module, {}, backend.parse_options(options), 90)
            source = os.path.join(scratch, f"kernel{index}.ttir")
            with open(source, "w") as f:
                f.write(str(module))
            compiled = triton.compile(source, target=target, options=options)
            ptx = os.path.join(scratch, f"kernel{index}.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            log = subprocess.run(
                [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                capture_output=True,
                text=True,
                check=True,
            ).stderr
            registers = int(re.search(r"Used (\d+) registers", log).group(1))
            stack = re.search(r"(\d+) bytes cumulative stack size", log)
            reports.append(
                KernelResources(
                    name=name,
                    num_warps=warps,
                    num_stages=stages,
                    registers=registers,
                    stack_bytes=int(stack.group(1)) if stack else 0,
                    shared_bytes=int(compiled.metadata.shared),
                )
            )
    return reports


def _selection_forward_backward(dk: int, dv: int, length: int = 1024, tuning=None):
    from pallas_kernels.gpu import selection

    q = jnp.zeros((1, length, 64, dk), jnp.bfloat16)
    k = jnp.zeros((1, length, 4, dk), jnp.bfloat16)
    v = jnp.zeros((1, length, 4, dv), jnp.bfloat16)
    indices = jnp.zeros((1, length, 4, 16), jnp.int32)

    def loss(q, k, v):
        out = selection.selected_attention(q, k, v, indices, block_size=64, scale=dk**-0.5, tuning=tuning)
        return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2)), (q, k, v)


@contextlib.contextmanager
def on_hopper():
    """The selection's Mosaic GPU paths taken as on the H200 (this machine has no GPU to ask)."""
    from pallas_kernels.gpu import selection_mosaic

    original = selection_mosaic._on_hopper
    selection_mosaic._on_hopper = lambda: True
    try:
        yield
    finally:
        selection_mosaic._on_hopper = original


def main() -> None:
    from experiments.selection_inputs import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--variant", default=None, help="a VARIANTS name of the head dims' config")
    args = parser.parse_args()
    tuning = None
    if args.variant is not None:
        config = VARIANTS["G16_D192_128" if args.dk == 192 else "G16_D128"]
        if args.variant not in config:
            parser.error(f"--variant must be one of {sorted(config)}, got {args.variant!r}")
        tuning = config[args.variant]
    fn, inputs = _selection_forward_backward(args.dk, args.dv, tuning=tuning)
    print(f"{'kernel':32} warps stages registers stack_B shared_B")
    with on_hopper():
        reports = kernel_resources(fn, *inputs)
    for r in reports:
        print(
            f"{r.name:32} {r.num_warps:5} {r.num_stages:6} {r.registers:9} {r.stack_bytes:7}"
            f" {r.shared_bytes:8}" + ("  SPILLS" if r.spills else "")
        )


if __name__ == "__main__":
    main()
