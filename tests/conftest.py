"""Test configuration: float64 is available everywhere (exactness tests use it explicitly)."""

import jax

jax.config.update("jax_enable_x64", True)
