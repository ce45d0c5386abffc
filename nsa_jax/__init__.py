"""nsa_jax: Native Sparse Attention in JAX (spec: NSA_SPEC.md)."""

from nsa_jax.config import NSAConfig
from nsa_jax.decoding import NSACache, decode_attention, generate
from nsa_jax.layer import NativeSparseAttention
from nsa_jax.linen import native_sparse_attention_linen
from nsa_jax.ops import (
    compressed_attention,
    nsa_attention,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)
from nsa_jax.reference.selection import overlap_weights, select_blocks_from_probabilities
from nsa_jax.registry import implementations

__all__ = [
    "NSACache",
    "NSAConfig",
    "NativeSparseAttention",
    "compressed_attention",
    "decode_attention",
    "generate",
    "implementations",
    "native_sparse_attention_linen",
    "nsa_attention",
    "overlap_weights",
    "select_blocks",
    "select_blocks_from_probabilities",
    "selected_attention",
    "sliding_window_attention",
]
