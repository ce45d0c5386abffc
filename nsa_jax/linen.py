"""Using the NNX layer from a Flax Linen model."""

from __future__ import annotations

from flax import linen as nn
from flax import nnx

from nsa_jax.config import NSAConfig
from nsa_jax.layer import NativeSparseAttention


def native_sparse_attention_linen(config: NSAConfig, *, name: str | None = None) -> nn.Module:
    """A Linen module wrapping :class:`NativeSparseAttention` through ``nnx.bridge``.

    ``module.init(key, x)`` creates the parameters (collection ``"params"``);
    ``module.apply(variables, x, segment_ids=..., positions=...)`` runs the layer
    with the same shapes as the NNX module: ``x [B, T, D] -> [B, T, D]``.
    """
    return nnx.bridge.to_linen(NativeSparseAttention, config, name=name)
