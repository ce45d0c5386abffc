"""Shared fixtures: fresh random inputs, tolerances, implementations under test."""

from __future__ import annotations

import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import oracle

# Relative-error bounds (norm(out - ref) / norm(ref)) against the float32 dense oracle; the
# bf16 bound covers bf16 rounding of outputs and cotangents.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}


def pytest_configure(config: pytest.Config) -> None:
    """A compilation cache for this process (each xdist worker has its own): many tests compile
    the same reference and kernel programs again, and a cache hit skips XLA's compile."""
    cache = tempfile.mkdtemp(prefix="nsa-jax-compile-cache-")
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def jitted_vjp(fn, args, cotangent, has_aux: bool = False):
    """``(fn(*args), vjp(cotangent))`` computed by one compiled program (``(out, grads, aux)``
    with ``has_aux``, ``fn`` returning ``(out, aux)``): run op by op, the references' many small
    ops and the interpret-mode kernels' dispatch made these tests slow."""

    def forward_and_backward(args, cotangent):
        out, vjp, *aux = jax.vjp(fn, *args, has_aux=has_aux)
        return out, vjp(cotangent), *aux

    return jax.jit(forward_and_backward)(tuple(args), cotangent)


class Inputs:
    """Fresh random attention inputs ``q [B,T,HQ,Dk]``, ``k [B,T,H,Dk]``, ``v [B,T,H,Dv]``."""

    def __init__(
        self, seed: int, batch: int, length: int, q_heads: int, kv_heads: int, dk: int, dv: int, dtype
    ):
        keys = jax.random.split(jax.random.key(seed), 4)
        self.q = jax.random.normal(keys[0], (batch, length, q_heads, dk), jnp.float32).astype(dtype)
        self.k = jax.random.normal(keys[1], (batch, length, kv_heads, dk), jnp.float32).astype(dtype)
        self.v = jax.random.normal(keys[2], (batch, length, kv_heads, dv), jnp.float32).astype(dtype)
        self.cotangent = jax.random.normal(keys[3], (batch, length, q_heads, dv), jnp.float32).astype(dtype)


def packed_segment_ids(batch: int, length: int, seed: int) -> np.ndarray:
    """int32 ``[B, T]`` with 1-3 segments of random lengths per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(0, 3), replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return np.asarray(rows, np.int32)


def random_block_indices(
    batch: int, length: int, kv_heads: int, num_slots: int, block_size: int, seed: int, segment_ids=None
) -> np.ndarray:
    """int32 ``[B, T, H, n]``: distinct visible blocks (relative to the segment start),
    always the query's own block, some slots ``-1``, in random order."""
    rng = np.random.default_rng(seed)
    rows = oracle.segments_of(segment_ids, batch, length)
    out = np.full((batch, length, kv_heads, num_slots), -1, np.int32)
    for b in range(batch):
        for t in range(length):
            current = (t - oracle.segment_start_of(rows[b], t)) // block_size
            for h in range(kv_heads):
                others = rng.permutation(current)[: rng.integers(0, num_slots)]
                chosen = np.concatenate([[current], others])
                slots = rng.permutation(num_slots)[: len(chosen)]
                out[b, t, h, slots] = chosen
    return out


def selected_implementations() -> list[str]:
    import nsa_jax

    return list(nsa_jax.implementations("selected_attention"))


@pytest.fixture(params=[jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def dtype(request):
    return request.param
