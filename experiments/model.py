"""A decoder-only byte LM whose attention is a config choice (full or NSA)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nsa_jax import NativeSparseAttention, NSAConfig
from nsa_jax.decoding import NSACache
from nsa_jax.rope import apply_rope
from nsa_jax.segments import segment_starts
from nsa_jax.sharding import lazy_sharding


def _partitioned(init, *names: str | None):
    return nnx.with_partitioning(init, names)


_DENSE = nnx.initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the LM; ``attention`` is ``"nsa"`` or ``"full"``."""

    vocab_size: int = 256
    num_layers: int = 2
    model_dim: int = 64
    mlp_dim: int = 172
    attention: str = "nsa"
    nsa: NSAConfig = dataclasses.field(
        default_factory=lambda: NSAConfig(
            model_dim=64,
            num_heads=4,
            num_kv_heads=1,
            head_dim_qk=16,
            head_dim_v=16,
            block_length=8,
            block_stride=4,
            selection_block_size=16,
            num_selected=4,
            window=32,
        )
    )

    def __post_init__(self) -> None:
        if self.attention not in ("nsa", "full"):
            raise ValueError(f"ModelConfig.attention must be 'nsa' or 'full', got {self.attention!r}")
        if self.nsa.model_dim != self.model_dim:
            raise ValueError(
                f"ModelConfig.nsa.model_dim ({self.nsa.model_dim}) must equal model_dim ({self.model_dim})"
            )


class FullAttention(nnx.Module):
    """Dense causal GQA attention with the NSA layer's head sizes (cuDNN on GPU, XLA elsewhere)."""

    def __init__(self, config: NSAConfig, *, rngs: nnx.Rngs):
        c = config
        if c.head_dim_v != c.head_dim_qk:
            raise ValueError(
                f"full attention needs head_dim_v == head_dim_qk, got {c.head_dim_v} and {c.head_dim_qk}"
            )
        self.config = c
        common = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        heads = _partitioned(_DENSE, "embed", "heads", "head_dim")
        kv_heads = _partitioned(_DENSE, "embed", "kv_heads", "head_dim")
        self.query = nnx.LinearGeneral(c.model_dim, (c.num_heads, c.head_dim_qk), kernel_init=heads, **common)
        self.key = nnx.LinearGeneral(
            c.model_dim, (c.num_kv_heads, c.head_dim_qk), kernel_init=kv_heads, **common
        )
        self.value = nnx.LinearGeneral(
            c.model_dim, (c.num_kv_heads, c.head_dim_v), kernel_init=kv_heads, **common
        )
        out_init = _partitioned(_DENSE, "heads", "head_dim", "embed")
        self.out = nnx.LinearGeneral(
            (c.num_heads, c.head_dim_v), c.model_dim, axis=(-2, -1), kernel_init=out_init, **common
        )

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """``x [B, T, D] -> [B, T, D]``."""
        batch, length, _ = x.shape
        positions = jnp.arange(length)[None] - segment_starts(segment_ids, batch, length)
        q = apply_rope(self.query(x), positions, theta=self.config.rope_theta)
        k = apply_rope(self.key(x), positions, theta=self.config.rope_theta)
        v = self.value(x)
        implementation = "cudnn" if jax.default_backend() == "gpu" and x.dtype == jnp.bfloat16 else None
        mask = (
            None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        )
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
        return self.out(out)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, c = config.model_dim, config.nsa
        norm = dict(scale_init=_partitioned(nnx.initializers.ones, "embed"), dtype=c.dtype, rngs=rngs)
        self.attention_norm = nnx.RMSNorm(d, param_dtype=c.param_dtype, **norm)
        attention_cls = NativeSparseAttention if config.attention == "nsa" else FullAttention
        self.attention = attention_cls(c, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d, param_dtype=c.param_dtype, **norm)
        common = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.gate = nnx.Linear(d, config.mlp_dim, kernel_init=_partitioned(_DENSE, "embed", "mlp"), **common)
        self.up = nnx.Linear(d, config.mlp_dim, kernel_init=_partitioned(_DENSE, "embed", "mlp"), **common)
        self.down = nnx.Linear(config.mlp_dim, d, kernel_init=_partitioned(_DENSE, "mlp", "embed"), **common)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), segment_ids=segment_ids).astype(x.dtype)
        return self._mlp(x)

    def _mlp(self, x: jax.Array) -> jax.Array:
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))

    def prefill(self, x: jax.Array, lengths: jax.Array, cache: NSACache) -> tuple[jax.Array, NSACache]:
        attended, cache = self.attention.prefill(self.attention_norm(x), lengths, cache)
        return self._mlp(x + attended.astype(x.dtype)), cache

    def decode(self, x: jax.Array, cache: NSACache) -> tuple[jax.Array, NSACache]:
        attended, cache = self.attention.decode(self.attention_norm(x), cache)
        return self._mlp(x + attended.astype(x.dtype)), cache


class TransformerLM(nnx.Module):
    """RMSNorm, SwiGLU MLP, RoPE; ``tokens [B, T] int -> logits [B, T, vocab] float32``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config.nsa
        with lazy_sharding():
            self.embed = nnx.Embed(
                config.vocab_size,
                config.model_dim,
                embedding_init=_partitioned(
                    nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0), "vocab", "embed"
                ),
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                rngs=rngs,
            )
            self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
            self.final_norm = nnx.RMSNorm(
                config.model_dim,
                scale_init=_partitioned(nnx.initializers.ones, "embed"),
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                rngs=rngs,
            )

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, segment_ids)
        return self.embed.attend(self.final_norm(x)).astype(jnp.float32)

    def _require_nsa(self) -> None:
        if self.config.attention != "nsa":
            raise ValueError(f"decoding needs attention='nsa', got {self.config.attention!r}")

    def init_cache(self, batch: int, capacity: int) -> tuple[NSACache, ...]:
        """One :class:`NSACache` per layer."""
        self._require_nsa()
        return tuple(block.attention.init_cache(batch, capacity) for block in self.blocks)

    def prefill(
        self, tokens: jax.Array, lengths: jax.Array, cache: tuple[NSACache, ...]
    ) -> tuple[jax.Array, tuple[NSACache, ...]]:
        """``tokens [B, P]`` right-padded, ``lengths [B]`` to ``(logits [B, P, V], cache)``."""
        self._require_nsa()
        x = self.embed(tokens)
        filled = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.prefill(x, lengths, layer_cache)
            filled.append(layer_cache)
        return self.embed.attend(self.final_norm(x)).astype(jnp.float32), tuple(filled)

    def decode(
        self, tokens: jax.Array, cache: tuple[NSACache, ...]
    ) -> tuple[jax.Array, tuple[NSACache, ...]]:
        """``tokens [B]`` at positions ``cache[0].lengths`` to ``(logits [B, V], cache)``."""
        self._require_nsa()
        x = self.embed(tokens)
        updated = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.decode(x, layer_cache)
            updated.append(layer_cache)
        return self.embed.attend(self.final_norm(x)).astype(jnp.float32), tuple(updated)


def next_token_loss(model: TransformerLM, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
