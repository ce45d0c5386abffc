"""Token compression ``phi`` (spec, "Compression branch (Eqs. 7-8)")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.segments import compressed_token_starts, num_compressed_slots, segment_starts


def gather_blocks(
    x: jax.Array, segment_ids: jax.Array | None, *, block_length: int, block_stride: int
) -> tuple[jax.Array, jax.Array]:
    """Raw blocks behind every compressed-token slot (layout of :mod:`nsa_jax.segments`).

    Args:
      x: ``[B, T, H, D]`` raw keys or values.
      segment_ids: int ``[B, T]`` or ``None``.

    Returns:
      ``(blocks, valid)``: ``blocks [B, Tc, l, H, D]`` with zeros in empty slots,
      ``valid`` bool ``[B, Tc]``; ``Tc = ceil(T / d)``.
    """
    batch, length = x.shape[:2]
    starts = compressed_token_starts(
        segment_starts(segment_ids, batch, length),
        num_compressed_slots(length, block_stride),
        block_length=block_length,
        block_stride=block_stride,
    )
    valid = starts >= 0
    positions = jnp.clip(starts[:, :, None] + jnp.arange(block_length), 0, length - 1)
    blocks = jnp.take_along_axis(x, positions.reshape(batch, -1)[:, :, None, None], axis=1)
    blocks = blocks.reshape(batch, starts.shape[1], block_length, *x.shape[2:])
    return jnp.where(valid[:, :, None, None, None], blocks, 0), valid


class BlockCompressor(nnx.Module):
    """``phi``: one block of ``l`` tokens ``[l, D]`` to one compressed token ``[D]``.

    ``"mlp"`` (the paper's): add a learnable intra-block position encoding, flatten,
    then a two-layer SiLU MLP. ``"mean"``: mean pooling (as fla-core), no parameters.
    Shared across KV heads.
    """

    def __init__(
        self,
        block_length: int,
        head_dim: int,
        *,
        kind: str = "mlp",
        hidden_dim: int | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kind = kind
        if kind != "mlp":
            return
        hidden_dim = hidden_dim or head_dim
        normal = nnx.initializers.normal(0.02)
        fan_in = nnx.initializers.lecun_normal()
        self.position = nnx.Param(
            nnx.with_partitioning(normal, ("block", "head_dim"))(
                rngs.params(), (block_length, head_dim), param_dtype
            )
        )
        self.w_in = nnx.Param(
            nnx.with_partitioning(fan_in, ("block", "head_dim", "mlp"))(
                rngs.params(), (block_length, head_dim, hidden_dim), param_dtype
            )
        )
        self.b_in = nnx.Param(
            nnx.with_partitioning(nnx.initializers.zeros, ("mlp",))(rngs.params(), (hidden_dim,), param_dtype)
        )
        self.w_out = nnx.Param(
            nnx.with_partitioning(fan_in, ("mlp", "head_dim"))(
                rngs.params(), (hidden_dim, head_dim), param_dtype
            )
        )
        self.b_out = nnx.Param(
            nnx.with_partitioning(nnx.initializers.zeros, ("head_dim",))(
                rngs.params(), (head_dim,), param_dtype
            )
        )

    def __call__(self, blocks: jax.Array, valid: jax.Array) -> jax.Array:
        """Compresses ``blocks [B, Tc, l, H, D]`` to ``[B, Tc, H, D]`` (0 where not ``valid``)."""
        if self.kind == "mean":
            out = jnp.mean(blocks.astype(jnp.promote_types(blocks.dtype, jnp.float32)), axis=2).astype(
                blocks.dtype
            )
        else:
            dtype = blocks.dtype
            blocks = blocks + self.position[...].astype(dtype)[None, None, :, None, :]
            hidden = jnp.einsum("bclhd,ldm->bchm", blocks, self.w_in[...].astype(dtype)) + self.b_in[
                ...
            ].astype(dtype)
            out = jnp.einsum("bchm,md->bchd", jax.nn.silu(hidden), self.w_out[...].astype(dtype))
            out = out + self.b_out[...].astype(dtype)
        return jnp.where(valid[:, :, None, None], out, 0)
