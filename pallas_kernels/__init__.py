"""Pallas kernels for nsa_jax; importing this package registers them (nsa_jax.registry)."""

import pallas_kernels.tpu.register  # noqa: F401  (registers the pallas_tpu implementations)
from nsa_jax import registry
from pallas_kernels.gpu import compressed, decode, decode_step, select_blocks, selection

# (op, kernel, its input check or None); every entry is GPU-only, interpretable, priority 10
# (above the xla references at 0).
_TRITON_KERNELS = (
    ("selected_attention", selection.selected_attention, selection.check),
    ("decode_selected_window", decode.selected_and_window, None),
    # H200, T=64K: 26.4 ms (Dk=192) against the xla reference's 110.9 ms, and equal to it
    # on the GPU checks (experiments/results/layer_h200.md, compression_h200.md).
    ("select_blocks", select_blocks.select_blocks, select_blocks.check),
    ("decode_compressed_selection", decode_step.compressed_and_selection, decode_step.check),
    ("compressed_attention", compressed.compressed_attention, compressed.check),
)

for _op, _kernel, _check in _TRITON_KERNELS:
    registry.register(
        registry.Implementation(
            op=_op,
            name="pallas_triton",
            fn=_kernel,
            platforms=("gpu",),
            priority=10,
            interpretable=True,
            check=_check,
        )
    )
