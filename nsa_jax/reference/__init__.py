"""Pure-JAX reference of every NSA branch (the ``"xla"`` implementation)."""
