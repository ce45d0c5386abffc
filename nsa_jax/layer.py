"""The NSA attention layer as a Flax NNX module (spec, "Output (Eq. 5)")."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import checks
from nsa_jax.compression import BlockCompressor, gather_blocks
from nsa_jax.config import NSAConfig
from nsa_jax.ops import nsa_attention
from nsa_jax.rope import apply_rope
from nsa_jax.segments import segment_starts

BRANCHES = ("compressed", "selected", "window")


def _lazy_sharding() -> contextlib.AbstractContextManager:
    """Parameters record logical names without being placed (older Flax never places)."""
    use_eager_sharding = getattr(nnx, "use_eager_sharding", None)
    return contextlib.nullcontext() if use_eager_sharding is None else use_eager_sharding(False)


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


class NativeSparseAttention(nnx.Module):
    """Native Sparse Attention: compressed, selected and sliding-window branches, gated.

    Queries are shared by the branches; each branch has its own key and value
    projections (paper 3.3.3). RoPE is applied to queries and to the raw keys of every
    branch (the compression branch compresses rotated keys). Parameters carry logical
    axis names (``nsa_jax.sharding.LOGICAL_AXIS_RULES`` maps them to a mesh); they are
    created without eager sharding, so the layer builds with or without a mesh.

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
        with _lazy_sharding():
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
        c = self.config
        checks.rank("x", x, 3, "[B, T, model_dim]")
        if x.shape[-1] != c.model_dim:
            raise ValueError(f"x must have last axis model_dim={c.model_dim}, got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
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
        q = jnp.einsum("btd,dhk->bthk", x, self.w_query[...].astype(c.dtype))
        keys = jnp.einsum("btd,dchk->cbthk", x, self.w_key[...].astype(c.dtype))
        values = jnp.einsum("btd,dchv->cbthv", x, self.w_value[...].astype(c.dtype))
        q = apply_rope(q, positions, theta=c.rope_theta)
        k_cmp, k_slc, k_win = (apply_rope(k, positions, theta=c.rope_theta) for k in keys)
        v_cmp, v_slc, v_win = values
        geometry = dict(block_length=c.block_length, block_stride=c.block_stride)
        k_cmp = self.compress_key(*gather_blocks(k_cmp, segment_ids, **geometry))
        v_cmp = self.compress_value(*gather_blocks(v_cmp, segment_ids, **geometry))
        out = nsa_attention(
            q,
            k_cmp,
            v_cmp,
            k_slc,
            v_slc,
            k_win,
            v_win,
            self.gates(x),
            segment_ids=segment_ids,
            **c.attention_kwargs(),
        )
        return jnp.einsum("bthv,hvd->btd", out, self.w_out[...].astype(c.dtype))
