"""Pallas GPU kernels (Triton lowering) for the NSA ops."""
