"""Training, ablations and benchmarks built on nsa_jax."""
