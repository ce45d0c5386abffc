"""Registers the Pallas TPU kernels as ``"pallas_tpu"`` (chosen by default on TPU).

``select_blocks`` has no TPU kernel: on TPU it runs the pure-JAX reference
(``"xla"``), which XLA compiles for TPU.
"""

from nsa_jax import registry
from pallas_kernels.tpu import dense, selection

registry.register_all(
    "pallas_tpu",
    ("tpu",),
    (
        ("selected_attention", selection.selected_attention, selection.check, 10),
        ("sliding_window_attention", dense.sliding_window_attention, dense.check, 10),
        ("compressed_attention", dense.compressed_attention, dense.check, 10),
    ),
    interpretable=True,
)
