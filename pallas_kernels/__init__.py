"""Pallas kernels for nsa_jax; importing this package registers them (nsa_jax.registry)."""

import pallas_kernels.tpu.register  # noqa: F401  (registers the pallas_tpu implementations)
from nsa_jax import registry
from pallas_kernels.gpu import compressed, decode, decode_step, select_blocks, selection

# (op, kernel, its input check or None, priority); every entry is GPU-only and interpretable.
# 10 is above the xla references (0); the window kernel stays below cuDNN (5) and serves
# what cuDNN does not: packed segments and float32.
_TRITON_KERNELS = (
    ("selected_attention", selection.selected_attention, selection.check, 10),
    ("decode_selected_window", decode.selected_and_window, None, 10),
    # H200, T=64K: 26.4 ms (Dk=192) against the xla reference's 110.9 ms, and equal to it
    # on the GPU checks (experiments/results/layer_h200.md, compression_h200.md).
    ("select_blocks", select_blocks.select_blocks, select_blocks.check, 10),
    ("decode_compressed_selection", decode_step.compressed_and_selection, decode_step.check, 10),
    # The two ops above chained, kernel 1 zeroing kernel 3's counters: one XLA memset fewer a step.
    ("decode_step", decode_step.whole_step, decode_step.check_whole_step, 10),
    ("compressed_attention", compressed.compressed_attention, compressed.check, 10),
    ("sliding_window_attention", compressed.sliding_window_attention, compressed.check_window, 3),
)

registry.register_all("pallas_triton", ("gpu",), _TRITON_KERNELS, interpretable=True)
