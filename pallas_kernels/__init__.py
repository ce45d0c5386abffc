"""Pallas kernels for nsa_jax; importing this package registers them (nsa_jax.registry)."""

import pallas_kernels.tpu.register  # noqa: F401  (registers the pallas_tpu implementations)
from nsa_jax import registry
from pallas_kernels.gpu import compressed, decode, decode_step, select_blocks, selection

registry.register(
    registry.Implementation(
        op="selected_attention",
        name="pallas_triton",
        fn=selection.selected_attention,
        platforms=("gpu",),
        priority=10,
        interpretable=True,
        check=selection.check,
    )
)
registry.register(
    registry.Implementation(
        op="decode_selected_window",
        name="pallas_triton",
        fn=decode.selected_and_window,
        platforms=("gpu",),
        priority=10,
        interpretable=True,
    )
)
registry.register(
    registry.Implementation(
        op="select_blocks",
        name="pallas_triton",
        fn=select_blocks.select_blocks,
        platforms=("gpu",),
        # H200, T=64K: 26.4 ms (Dk=192) against the xla reference's 110.9 ms, and equal to it
        # on the GPU checks (experiments/results/layer_h200.md, compression_h200.md).
        priority=10,
        interpretable=True,
        check=select_blocks.check,
    )
)
registry.register(
    registry.Implementation(
        op="decode_compressed_selection",
        name="pallas_triton",
        fn=decode_step.compressed_and_selection,
        platforms=("gpu",),
        priority=10,
        interpretable=True,
        check=decode_step.check,
    )
)
registry.register(
    registry.Implementation(
        op="compressed_attention",
        name="pallas_triton",
        fn=compressed.compressed_attention,
        platforms=("gpu",),
        priority=10,
        interpretable=True,
        check=compressed.check,
    )
)
