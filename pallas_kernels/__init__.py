"""Pallas kernels for slimqwen_jax, one folder per op: reference.py (jnp), kernel.py (and its helpers), ops.py."""
