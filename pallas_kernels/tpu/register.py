"""Registers the Pallas TPU kernels as ``"pallas_tpu"`` (chosen by default on TPU).

``select_blocks`` has no TPU kernel: on TPU it runs the pure-JAX reference
(``"xla"``), which XLA compiles for TPU.
"""

from nsa_jax import registry
from pallas_kernels.tpu import dense, selection

for _op, _fn, _check in (
    ("selected_attention", selection.selected_attention, selection.check),
    ("sliding_window_attention", dense.sliding_window_attention, dense.check),
    ("compressed_attention", dense.compressed_attention, dense.check),
):
    registry.register(
        registry.Implementation(
            op=_op,
            name="pallas_tpu",
            fn=_fn,
            platforms=("tpu",),
            priority=10,
            interpretable=True,
            check=_check,
        )
    )
