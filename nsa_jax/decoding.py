"""Decoding with NSA: the per-layer cache and one decode step of attention (spec, "Decoding").

A step reads at most ``floor((s - l) / d) + 1`` compressed tokens, ``n * l'`` selected
tokens and ``w`` window tokens, ``s`` the cached length. The compressed cache gains
one entry every ``d`` tokens, once a block of ``l`` raw tokens is complete; nothing in
the past is recompressed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from nsa_jax import registry
from nsa_jax.reference.common import PRECISION, accumulation_dtype, masked_softmax
from nsa_jax.reference.compressed import attend_compressed
from nsa_jax.reference.selected import attend_selected
from nsa_jax.reference.selection import select_for_chunk

# Logical axis names of the cache's arrays (rules in nsa_jax.sharding).
CACHE_LOGICAL_AXES = {
    "keys": ("branch", "batch", "length", "kv_heads", "head_dim"),
    "values": ("branch", "batch", "length", "kv_heads", "head_dim"),
    "k_cmp": ("batch", "length", "kv_heads", "head_dim"),
    "v_cmp": ("batch", "length", "kv_heads", "head_dim"),
    "lengths": ("batch",),
}


@struct.dataclass
class NSACache:
    """Decoding state of one NSA layer; a pytree that shards over batch and KV heads.

    Attributes:
      keys: ``[3, B, S, H, Dk]`` raw rotated keys of the (compressed, selected,
        window) branches, ``S`` the capacity.
      values: ``[3, B, S, H, Dv]``.
      k_cmp: ``[B, ceil(S / d), H, Dk]`` compressed keys; slot ``i`` covers raw
        tokens ``[i*d, i*d + l)`` and is valid once ``lengths >= i*d + l``.
      v_cmp: ``[B, ceil(S / d), H, Dv]``.
      lengths: int32 ``[B]``: tokens cached per sequence (ragged batch).
    """

    keys: jax.Array
    values: jax.Array
    k_cmp: jax.Array
    v_cmp: jax.Array
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


def attend_window_at(
    q: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array, *, window: int, scale: float
) -> jax.Array:
    """Window attention of one query per row, reading only its ``w`` keys.

    Args:
      q: ``[B, 1, HQ, Dk]``; positions: int32 ``[B, 1]``; k: ``[B, S, H, Dk]``;
      v: ``[B, S, H, Dv]``.

    Returns:
      ``[B, 1, HQ, Dv]`` in ``q.dtype``.
    """
    batch, _, q_heads, _ = q.shape
    kv_heads = k.shape[2]
    window = min(window, k.shape[1])
    key_pos = positions - window + 1 + jnp.arange(window, dtype=jnp.int32)  # [B, w]
    index = jnp.clip(key_pos, 0, k.shape[1] - 1)[:, :, None, None]
    keys = jnp.take_along_axis(k, index, axis=1)
    values = jnp.take_along_axis(v, index, axis=1)
    queries = q.reshape(batch, kv_heads, q_heads // kv_heads, -1)
    logits = (
        jnp.einsum(
            "bhgd,bshd->bhgs",
            queries,
            keys,
            preferred_element_type=accumulation_dtype(q.dtype),
            precision=PRECISION,
        )
        * scale
    )
    probs, _ = masked_softmax(logits, (key_pos >= 0)[:, None, None, :])
    out = jnp.einsum("bhgs,bshd->bhgd", probs, values.astype(probs.dtype), precision=PRECISION)
    return out.reshape(batch, 1, q_heads, -1).astype(q.dtype)


def selected_and_window_at(
    q: jax.Array,
    block_indices: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    lengths: jax.Array,
    *,
    block_size: int,
    window: int,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Reference of the decode step's selected and window reads (op ``decode_selected_window``).

    Args:
      q: ``[B, HQ, Dk]``; block_indices: int ``[B, H, n]`` (``-1`` unused);
      keys: ``[3, B, S, H, Dk]``; values: ``[3, B, S, H, Dv]`` (branch 1 selected,
      branch 2 window); lengths: int ``[B]``, the query at ``lengths - 1``.

    Returns:
      ``(selected, window)``, each ``[B, HQ, Dv]`` in ``q.dtype``.
    """
    positions = (lengths - 1)[:, None]
    starts = jnp.zeros_like(positions)
    query = q[:, None]
    selected = attend_selected(
        query,
        block_indices[:, None],
        starts,
        positions,
        keys[1],
        values[1],
        block_size=block_size,
        scale=scale,
    )
    windowed = attend_window_at(query, positions, keys[2], values[2], window=window, scale=scale)
    return selected[:, 0], windowed[:, 0]


registry.register(
    registry.Implementation(
        op="decode_selected_window",
        name="xla",
        fn=selected_and_window_at,
        platforms=("cpu", "gpu", "tpu"),
    )
)


def compressed_and_selection_at(
    q: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    lengths: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Reference of the decode step's compressed attention and block selection
    (op ``decode_compressed_selection``; spec, "Compression branch", "Selection scores", Eq. 11).

    Args:
      q: ``[B, HQ, Dk]``; k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]``; lengths:
        int ``[B]`` in ``[1, Tc * d]``, the query of row ``b`` at ``lengths[b] - 1``.

    Returns:
      ``(compressed [B, HQ, Dv]`` in ``q.dtype``, ``block_indices`` int32 ``[B, H, n])``:
      ascending, ``-1`` (unused) last.
    """
    batch, num_slots = k_cmp.shape[:2]
    positions = (lengths.astype(jnp.int32) - 1)[:, None]
    starts = jnp.zeros((batch, 1), jnp.int32)
    token_starts = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32) * block_stride, (batch, num_slots))
    query = q[:, None]
    compressed, lse = attend_compressed(
        query, positions, starts, token_starts, k_cmp, v_cmp, block_length=block_length, scale=scale
    )
    block_indices = select_for_chunk(
        query,
        lse,
        positions,
        starts,
        token_starts,
        k_cmp,
        # Every block that can hold a query (lengths <= Tc * d); later ones would be invisible.
        num_blocks=-(-num_slots * block_stride // selection_block_size),
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=scale,
    )
    return compressed[:, 0], block_indices[:, 0]


registry.register(
    registry.Implementation(
        op="decode_compressed_selection",
        name="xla",
        fn=compressed_and_selection_at,
        platforms=("cpu", "gpu", "tpu"),
    )
)


def decode_step_at(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    k_cmp: jax.Array,
    v_cmp: jax.Array,
    lengths: jax.Array,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    window: int,
    num_initial_blocks: int,
    num_local_blocks: int,
    scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reference of a whole decode step (op ``decode_step``): :func:`compressed_and_selection_at`,
    then :func:`selected_and_window_at` on its blocks. Implementations may chain their kernels
    of the two ops more tightly than two op calls can.

    Args:
      q: ``[B, HQ, Dk]``; keys: ``[3, B, S, H, Dk]`` and values ``[3, B, S, H, Dv]`` (branch 1
        selected, 2 window); k_cmp: ``[B, Tc, H, Dk]``; v_cmp: ``[B, Tc, H, Dv]``; lengths: int
        ``[B]``, the query of row ``b`` at ``lengths[b] - 1``.

    Returns:
      ``(compressed, selected, window)``, each ``[B, HQ, Dv]`` in ``q.dtype``.
    """
    compressed, block_indices = compressed_and_selection_at(
        q,
        k_cmp,
        v_cmp,
        lengths,
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=scale,
    )
    selected, windowed = selected_and_window_at(
        q, block_indices, keys, values, lengths, block_size=selection_block_size, window=window, scale=scale
    )
    return compressed, selected, windowed


registry.register(
    registry.Implementation(op="decode_step", name="xla", fn=decode_step_at, platforms=("cpu", "gpu", "tpu"))
)


def decode_attention(
    q: jax.Array,
    cache: NSACache,
    *,
    block_length: int,
    block_stride: int,
    selection_block_size: int,
    num_selected: int,
    window: int,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    scale: float | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The three branch outputs for the newest token of every sequence.

    The query of row ``b`` sits at position ``cache.lengths[b] - 1``; the cache
    already holds its keys and values (and any compressed token its step completed).

    Args:
      q: ``[B, HQ, Dk]``.
      implementation: of the op ``decode_step`` (compressed attention and top-n, then the
        selected and window reads; :func:`decode_step_at`); ``None`` picks the best for the
        backend.

    Returns:
      ``(compressed, selected, window)``, each ``[B, HQ, Dv]`` in ``q.dtype``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (q, cache.keys, cache.values, cache.k_cmp, cache.v_cmp, cache.lengths)
    kwargs = dict(
        block_length=block_length,
        block_stride=block_stride,
        selection_block_size=selection_block_size,
        num_selected=num_selected,
        window=window,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        scale=scale,
    )
    return registry.resolve("decode_step", implementation, *args, **kwargs)(*args, **kwargs)


def _compiled_steps(model: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``model.prefill`` and ``model.decode``, compiled once per shape (NNX modules via ``nnx.jit``)."""
    if not isinstance(model, nnx.Module):
        return model.prefill, model.decode
    prefill = nnx.jit(lambda m, tokens, lengths, cache: m.prefill(tokens, lengths, cache))
    decode = nnx.jit(lambda m, tokens, cache: m.decode(tokens, cache))
    return (
        lambda tokens, lengths, cache: prefill(model, tokens, lengths, cache),
        lambda tokens, cache: decode(model, tokens, cache),
    )


def generate(
    model: Any,
    prompt: jax.Array,
    prompt_lengths: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    progress: Callable[[int], None] | None = None,
) -> jax.Array:
    """Greedy (``temperature=0``) or sampled generation with a cached model.

    ``model`` provides ``init_cache(batch, capacity)``, ``prefill(tokens, lengths,
    cache) -> (logits [B, P, V], cache)`` and ``decode(tokens [B], cache) ->
    (logits [B, V], cache)``, as ``experiments.model.TransformerLM`` does.

    Args:
      prompt: int ``[B, P]``, right-padded; prompt_lengths: int ``[B]`` in ``[1, P]``.
      max_new_tokens: tokens to generate per sequence.
      temperature: 0 for greedy, else softmax temperature (needs ``rng``).
      progress: called with the step number after each step.

    Returns:
      int32 ``[B, max_new_tokens]``: row ``b`` continues ``prompt[b, :prompt_lengths[b]]``.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("rng must be given when temperature > 0")
    batch, prompt_len = prompt.shape
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if prompt_lengths.shape != (batch,):
        raise ValueError(f"prompt_lengths must have shape (B,) = {(batch,)}, got {prompt_lengths.shape}")
    prefill, decode = _compiled_steps(model)
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = prefill(prompt, prompt_lengths, cache)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]

    def choose(logits: jax.Array, key: jax.Array | None) -> jax.Array:
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    keys = [None] * max_new_tokens if rng is None else list(jax.random.split(rng, max_new_tokens))
    tokens = []
    for step in range(max_new_tokens):
        token = choose(last, keys[step])
        tokens.append(token)
        if step + 1 < max_new_tokens:
            last, cache = decode(token, cache)
        if progress is not None:
            progress(step)
    return jnp.stack(tokens, axis=1)
