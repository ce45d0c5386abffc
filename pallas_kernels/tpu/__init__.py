"""Pallas TPU (Mosaic) kernels for the NSA ops; :mod:`pallas_kernels.tpu.register` registers them."""
