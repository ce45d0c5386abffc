"""The NSA attention layer as a Flax NNX module (spec, "Output (Eq. 5)")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import checks
from nsa_jax.compression import BlockCompressor, gather_blocks
from nsa_jax.config import NSAConfig
from nsa_jax.decoding import NSACache, decode_attention
from nsa_jax.ops import BRANCHES, combine_branches, nsa_attention
from nsa_jax.rope import apply_rope
from nsa_jax.segments import num_compressed_slots, segment_starts
from nsa_jax.sharding import context_mesh, lazy_sharding, sharded_ops


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


class NativeSparseAttention(nnx.Module):
    """Native Sparse Attention: compressed, selected and sliding-window branches, gated.

    Queries are shared by the branches; each branch has its own key and value
    projections (paper 3.3.3). RoPE is applied to queries and to the raw keys of every
    branch (the compression branch compresses rotated keys). Parameters carry logical
    axis names (``nsa_jax.sharding.LOGICAL_AXIS_RULES`` maps them to a mesh); they are
    created without eager sharding, so the layer builds with or without a mesh.

    Under ``jax.set_mesh(mesh)`` the attention op runs per shard (``jax.shard_map``,
    :func:`nsa_jax.sharding.sharded_ops`): batch over the mesh's ``data`` and ``fsdp``
    axes, KV heads (with their query heads) over ``tensor``; an axis group whose size
    does not divide ``B`` or ``H`` leaves that dimension whole.

    Example::

        layer = NativeSparseAttention(NSAConfig(model_dim=512, num_heads=8, num_kv_heads=2,
                                                head_dim_qk=64, head_dim_v=64), rngs=nnx.Rngs(0))
        y = layer(x)  # x [B, T, 512] -> y [B, T, 512]
    """

    def __init__(self, config: NSAConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
        self.config = config
        c = config
        dense = nnx.initializers.lecun_normal()
        zeros = nnx.initializers.zeros
        pd = c.param_dtype
        gate_hidden = c.gate_hidden_dim or c.model_dim
        with lazy_sharding():
            self.w_query = _param(
                rngs, dense, (c.model_dim, c.num_heads, c.head_dim_qk), ("embed", "heads", "head_dim"), pd
            )
            self.w_key = _param(
                rngs,
                dense,
                (c.model_dim, 3, c.num_kv_heads, c.head_dim_qk),
                ("embed", "branch", "kv_heads", "head_dim"),
                pd,
            )
            self.w_value = _param(
                rngs,
                dense,
                (c.model_dim, 3, c.num_kv_heads, c.head_dim_v),
                ("embed", "branch", "kv_heads", "head_dim"),
                pd,
            )
            self.w_out = _param(
                rngs,
                nnx.initializers.variance_scaling(
                    1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
                ),
                (c.num_heads, c.head_dim_v, c.model_dim),
                ("heads", "head_dim", "embed"),
                pd,
            )
            self.w_gate_in = _param(rngs, dense, (c.model_dim, gate_hidden), ("embed", "mlp"), pd)
            self.b_gate_in = _param(rngs, zeros, (gate_hidden,), ("mlp",), pd)
            self.w_gate_out = _param(
                rngs, dense, (gate_hidden, c.num_heads, 3), ("mlp", "heads", "branch"), pd
            )
            self.b_gate_out = _param(rngs, zeros, (c.num_heads, 3), ("heads", "branch"), pd)
            compressor = dict(
                kind=c.compression, hidden_dim=c.compression_hidden_dim, param_dtype=pd, rngs=rngs
            )
            self.compress_key = BlockCompressor(c.block_length, c.head_dim_qk, **compressor)
            self.compress_value = BlockCompressor(c.block_length, c.head_dim_v, **compressor)

    def gates(self, x: jax.Array) -> jax.Array:
        """Gate values ``sigmoid(MLP(x))``: ``x [B, T, D]`` to ``[B, T, HQ, 3]``."""
        dtype = self.config.dtype
        hidden = jax.nn.silu(x @ self.w_gate_in[...].astype(dtype) + self.b_gate_in[...].astype(dtype))
        logits = jnp.einsum("btm,mhg->bthg", hidden, self.w_gate_out[...].astype(dtype))
        return jax.nn.sigmoid(logits + self.b_gate_out[...].astype(dtype))

    def _check_input(self, x: jax.Array) -> None:
        checks.rank("x", x, 3, "[B, T, model_dim]")
        if x.shape[-1] != self.config.model_dim:
            raise ValueError(
                f"x must have last axis model_dim={self.config.model_dim}, got shape {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a floating array, got dtype {x.dtype}")

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [B, T, D]`` to rotated ``q [B, T, HQ, Dk]``, rotated keys ``[3, B, T, H, Dk]``
        and values ``[3, B, T, H, Dv]`` of the (compressed, selected, window) branches."""
        c = self.config
        q = jnp.einsum("btd,dhk->bthk", x, self.w_query[...].astype(c.dtype))
        keys = jnp.einsum("btd,dchk->cbthk", x, self.w_key[...].astype(c.dtype))
        values = jnp.einsum("btd,dchv->cbthv", x, self.w_value[...].astype(c.dtype))
        q = apply_rope(q, positions, theta=c.rope_theta)
        keys = jax.vmap(lambda k: apply_rope(k, positions, theta=c.rope_theta))(keys)
        return q, keys, values

    def _compress(
        self, keys: jax.Array, values: jax.Array, segment_ids: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Compressed keys/values ``[B, ceil(T/d), H, D]`` (slot layout) from raw ``[B, T, H, D]``."""
        geometry = dict(block_length=self.config.block_length, block_stride=self.config.block_stride)
        k_cmp = self.compress_key(*gather_blocks(keys, segment_ids, **geometry))
        v_cmp = self.compress_value(*gather_blocks(values, segment_ids, **geometry))
        return k_cmp, v_cmp

    def _output(self, heads: jax.Array) -> jax.Array:
        """``[B, T, HQ, Dv]`` to ``[B, T, model_dim]``."""
        return jnp.einsum("bthv,hvd->btd", heads, self.w_out[...].astype(self.config.dtype))

    def __call__(
        self, x: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[B, T, model_dim]``.
          segment_ids: int ``[B, T]`` for packed sequences; no branch crosses a
            segment boundary.
          positions: int ``[B, T]`` RoPE positions; default ``t`` minus the start
            of ``t``'s segment.

        Returns:
          ``[B, T, model_dim]`` in ``config.dtype``.
        """
        out, _, _, _ = self._forward(x, segment_ids=segment_ids, positions=positions)
        return out

    def _forward(
        self, x: jax.Array, *, segment_ids: jax.Array | None, positions: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        c = self.config
        self._check_input(x)
        batch, length, _ = x.shape
        checks.segment_ids(segment_ids, batch, length)
        if positions is None:
            positions = jnp.arange(length, dtype=jnp.int32)[None, :] - segment_starts(
                segment_ids, batch, length
            )
        else:
            checks.rank("positions", positions, 2, "[B, T]")
            checks.integer_array("positions", positions)
            if tuple(positions.shape) != (batch, length):
                raise ValueError(
                    f"positions must have shape (B, T) = {(batch, length)}, got {tuple(positions.shape)}"
                )
        x = x.astype(c.dtype)
        q, keys, values = self._project(x, positions)
        compressed = self._compress(keys[0], values[0], segment_ids)
        mesh = context_mesh()
        attention = (
            nsa_attention
            if mesh is None
            else sharded_ops(mesh, batch=batch, kv_heads=c.num_kv_heads).nsa_attention
        )
        out = attention(
            q,
            *compressed,
            keys[1],
            values[1],
            keys[2],
            values[2],
            self.gates(x),
            segment_ids=segment_ids,
            **c.attention_kwargs(),
        )
        return self._output(out), keys, values, compressed

    def init_cache(self, batch: int, capacity: int) -> NSACache:
        """An empty decoding cache for ``batch`` sequences of up to ``capacity`` tokens."""
        c = self.config
        batch = checks.positive_int("batch", batch)
        capacity = checks.positive_int("capacity", capacity)
        slots = num_compressed_slots(capacity, c.block_stride)
        return NSACache(
            keys=jnp.zeros((3, batch, capacity, c.num_kv_heads, c.head_dim_qk), c.dtype),
            values=jnp.zeros((3, batch, capacity, c.num_kv_heads, c.head_dim_v), c.dtype),
            k_cmp=jnp.zeros((batch, slots, c.num_kv_heads, c.head_dim_qk), c.dtype),
            v_cmp=jnp.zeros((batch, slots, c.num_kv_heads, c.head_dim_v), c.dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    def prefill(self, x: jax.Array, lengths: jax.Array, cache: NSACache) -> tuple[jax.Array, NSACache]:
        """Runs the layer on right-padded prompts and fills an empty cache.

        Args:
          x: ``[B, P, model_dim]``; row ``b`` is real up to ``lengths[b]``.
          lengths: int ``[B]`` prompt lengths, ``1 <= lengths <= P``.
          cache: from :meth:`init_cache` with capacity ``>= P``.

        Returns:
          ``(y [B, P, model_dim], cache)``; ``y`` past a row's length is padding.
        """
        prompt = x.shape[1]
        if prompt > cache.capacity:
            raise ValueError(f"x has {prompt} tokens, more than the cache capacity {cache.capacity}")
        out, keys, values, (k_cmp, v_cmp) = self._forward(x, segment_ids=None, positions=None)
        # Padding beyond a row's length is written too: it is overwritten, position by
        # position, before any query can see it (keys after the query are masked).
        cache = cache.replace(
            keys=jax.lax.dynamic_update_slice_in_dim(cache.keys, keys.astype(cache.keys.dtype), 0, axis=2),
            values=jax.lax.dynamic_update_slice_in_dim(
                cache.values, values.astype(cache.values.dtype), 0, axis=2
            ),
            k_cmp=jax.lax.dynamic_update_slice_in_dim(
                cache.k_cmp, k_cmp.astype(cache.k_cmp.dtype), 0, axis=1
            ),
            v_cmp=jax.lax.dynamic_update_slice_in_dim(
                cache.v_cmp, v_cmp.astype(cache.v_cmp.dtype), 0, axis=1
            ),
            lengths=jnp.asarray(lengths, jnp.int32),
        )
        return out, cache

    def decode(self, x: jax.Array, cache: NSACache) -> tuple[jax.Array, NSACache]:
        """One decoding step: the next token of every sequence.

        Args:
          x: ``[B, model_dim]``, the input at position ``cache.lengths``.
          cache: the layer's cache; its capacity must exceed ``cache.lengths``.

        Returns:
          ``(y [B, model_dim], cache)`` with the token appended.
        """
        c = self.config
        batch = cache.lengths.shape[0]
        if x.ndim != 2 or tuple(x.shape) != (batch, c.model_dim):
            raise ValueError(
                f"x must have shape (B, model_dim) = {(batch, c.model_dim)}, got {tuple(x.shape)}"
            )
        x = x.astype(c.dtype)[:, None]
        position = cache.lengths
        q, keys, values = self._project(x, position[:, None])
        rows = jnp.arange(batch)
        keys_all = cache.keys.at[:, rows, position].set(keys[:, :, 0].astype(cache.keys.dtype), mode="drop")
        values_all = cache.values.at[:, rows, position].set(
            values[:, :, 0].astype(cache.values.dtype), mode="drop"
        )
        k_cmp, v_cmp = self._append_compressed(keys_all[0], values_all[0], position, cache)
        cache = cache.replace(
            keys=keys_all, values=values_all, k_cmp=k_cmp, v_cmp=v_cmp, lengths=position + 1
        )
        outputs = decode_attention(q[:, 0], cache, **c.decode_kwargs())
        outputs = [
            o if name in c.branches else jnp.zeros_like(o) for name, o in zip(BRANCHES, outputs, strict=True)
        ]
        heads = combine_branches(self.gates(x)[:, 0], *outputs)
        return self._output(heads[:, None])[:, 0], cache

    def _append_compressed(
        self, raw_keys: jax.Array, raw_values: jax.Array, position: jax.Array, cache: NSACache
    ) -> tuple[jax.Array, jax.Array]:
        """Writes the compressed token that the token at ``position`` completes, if any."""
        c = self.config
        first = position + 1 - c.block_length  # first raw token of the block ending here
        completes = (first >= 0) & (first % c.block_stride == 0)
        slot = jnp.where(completes, first // c.block_stride, cache.k_cmp.shape[1])
        index = jnp.clip(first, 0, None)[:, None] + jnp.arange(c.block_length)
        valid = completes[:, None]

        def compress(raw: jax.Array, compressor: BlockCompressor) -> jax.Array:
            blocks = jnp.take_along_axis(raw, index[:, :, None, None], axis=1)
            return compressor(blocks[:, None], valid)[:, 0]

        rows = jnp.arange(position.shape[0])
        k_new = compress(raw_keys, self.compress_key).astype(cache.k_cmp.dtype)
        v_new = compress(raw_values, self.compress_value).astype(cache.v_cmp.dtype)
        return (
            cache.k_cmp.at[rows, slot].set(k_new, mode="drop"),
            cache.v_cmp.at[rows, slot].set(v_new, mode="drop"),
        )
