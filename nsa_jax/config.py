"""Configuration of the NSA layer, with the paper's defaults (spec, "Notation")."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Every size of one NSA attention layer; validated on construction.

    Attributes:
      model_dim: width ``D`` of the layer input and output.
      num_heads: query heads ``HQ``.
      num_kv_heads: key/value heads ``H`` (``HQ % H == 0``; ``G = HQ / H``).
      head_dim_qk: ``Dk``, query/key head dim (even, for RoPE).
      head_dim_v: ``Dv``, value head dim.
      block_length: ``l``, compression block length.
      block_stride: ``d``, compression stride (``d | l``, ``d | l'``).
      selection_block_size: ``l'`` (``l <= l'``).
      num_selected: ``n``, selected blocks per query counting forced ones.
      window: ``w``, sliding window length.
      num_initial_blocks, num_local_blocks: forced blocks (paper: 1 and 2).
      compression: ``"mlp"`` (paper, with intra-block position encoding) or
        ``"mean"`` (mean pooling, as fla-core does).
      compression_hidden_dim: hidden width of the compression MLP (default ``Dk``).
      gate_hidden_dim: hidden width of the gate MLP (default ``model_dim``).
      rope_theta: RoPE base.
      dtype: compute dtype of activations; param_dtype: dtype of parameters.
      implementation: passed to :func:`nsa_jax.nsa_attention` (``None``: best).
      branches: branches that contribute (ablations drop some; see
        :func:`nsa_jax.nsa_attention`).
    """

    model_dim: int
    num_heads: int = 64
    num_kv_heads: int = 4
    head_dim_qk: int = 192
    head_dim_v: int = 128
    block_length: int = 32
    block_stride: int = 16
    selection_block_size: int = 64
    num_selected: int = 16
    window: int = 512
    num_initial_blocks: int = 1
    num_local_blocks: int = 2
    compression: Literal["mlp", "mean"] = "mlp"
    compression_hidden_dim: int | None = None
    gate_hidden_dim: int | None = None
    rope_theta: float = 10_000.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    implementation: str | None = None
    branches: tuple[str, ...] = ("compressed", "selected", "window")

    def __post_init__(self) -> None:
        positive = (
            "model_dim",
            "num_heads",
            "num_kv_heads",
            "head_dim_qk",
            "head_dim_v",
            "block_length",
            "block_stride",
            "selection_block_size",
            "num_selected",
            "window",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NSAConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_initial_blocks", "num_local_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"NSAConfig.{name} must be a non-negative int, got {value!r}")
        for name in ("compression_hidden_dim", "gate_hidden_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"NSAConfig.{name} must be None or a positive int, got {value!r}")
        rules = (
            (self.num_heads % self.num_kv_heads == 0, "num_heads must be divisible by num_kv_heads"),
            (self.block_length % self.block_stride == 0, "block_stride must divide block_length (d | l)"),
            (
                self.selection_block_size % self.block_stride == 0,
                "block_stride must divide selection_block_size (d | l')",
            ),
            (
                self.block_length <= self.selection_block_size,
                "block_length must not exceed selection_block_size (l <= l')",
            ),
            (
                self.num_selected >= self.num_initial_blocks + self.num_local_blocks,
                "num_selected must be at least num_initial_blocks + num_local_blocks (the forced blocks)",
            ),
            (self.head_dim_qk % 2 == 0, "head_dim_qk must be even (RoPE rotates pairs)"),
            (self.compression in ("mlp", "mean"), "compression must be 'mlp' or 'mean'"),
            (self.rope_theta > 0, "rope_theta must be positive"),
            (
                bool(self.branches) and set(self.branches) <= {"compressed", "selected", "window"},
                "branches must be a non-empty subset of ('compressed', 'selected', 'window')",
            ),
        )
        for holds, rule in rules:
            if not holds:
                raise ValueError(f"NSAConfig: {rule}; got {self._summary()}")
        for name in ("dtype", "param_dtype"):
            if not jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating):
                raise ValueError(f"NSAConfig.{name} must be a floating dtype, got {getattr(self, name)!r}")

    def _summary(self) -> str:
        return (
            f"HQ={self.num_heads}, H={self.num_kv_heads}, Dk={self.head_dim_qk}, l={self.block_length}, "
            f"d={self.block_stride}, l'={self.selection_block_size}, n={self.num_selected}, "
            f"forced={self.num_initial_blocks}+{self.num_local_blocks}, compression={self.compression!r}"
        )

    @property
    def group_size(self) -> int:
        """``G = HQ / H``."""
        return self.num_heads // self.num_kv_heads

    def decode_kwargs(self) -> dict[str, int]:
        """Keyword arguments of :func:`nsa_jax.decoding.decode_attention` for this config."""
        kwargs = self.attention_kwargs()
        del kwargs["implementation"], kwargs["branches"]
        return kwargs

    def attention_kwargs(self) -> dict[str, int | str | tuple[str, ...] | None]:
        """Keyword arguments of :func:`nsa_jax.nsa_attention` for this config."""
        return dict(
            block_length=self.block_length,
            block_stride=self.block_stride,
            selection_block_size=self.selection_block_size,
            num_selected=self.num_selected,
            window=self.window,
            num_initial_blocks=self.num_initial_blocks,
            num_local_blocks=self.num_local_blocks,
            implementation=self.implementation,
            branches=self.branches,
        )
