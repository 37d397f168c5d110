"""Statistics of stochastic influence estimates on a fixed trajectory (for tests and benchmarks).

On a fixed trajectory (fixed parameters and inputs, learning rate 0) an unbiased estimator's final
trace ``J̃_T`` has mean ``J_T``, the exact RTRL influence. These helpers run an estimator over the
trajectory for many keys and compare the estimates with the exact value. Nothing is jitted here:
wrap the calls in ``jax.jit`` (``estimator`` static through a closure).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rtrl_jax._src.base import Estimator, influence_matrix
from rtrl_jax._src.online import rollout


def final_influence(
    estimator: Estimator, params: Any, carry: Any, inputs: jax.Array, key: jax.Array
) -> jax.Array:
    """The dense ``S × P`` influence of ``estimator``'s trace after the steps ``inputs`` (T, ...)."""
    carry, trace, _ = rollout(estimator, params, carry, inputs, key=key)
    return influence_matrix(estimator, trace, params, carry)


def sample_final_influences(
    estimator: Estimator,
    params: Any,
    carry: Any,
    inputs: jax.Array,
    keys: jax.Array,
    *,
    batch_size: int = 200,
) -> jax.Array:
    """``(N, S, P)``: one :func:`final_influence` per key of ``keys`` (N,).

    The keys are vmapped in chunks of ``batch_size`` (``jax.lax.map``), which bounds the memory of
    the intermediate traces.
    """
    return jax.lax.map(
        lambda k: final_influence(estimator, params, carry, inputs, k),
        keys,
        batch_size=min(batch_size, keys.shape[0]),
    )


def mean_error_ratio(samples: jax.Array, exact: jax.Array) -> jax.Array:
    """``‖mean − exact‖² / (tr Σ̂ / N)`` for ``N`` samples: about 1 for an unbiased estimator.

    Under unbiasedness and the central limit theorem the ratio is a weighted mean of ``χ²_1``
    variables (weights: the eigenvalues of the covariance), so its upper tail is no heavier than one
    ``χ²_1``'s: a value above ``z²`` is rejected at the level of a two-sided ``z``-test.
    """
    n = samples.shape[0]
    flat = samples.reshape(n, -1)
    mean = flat.mean(axis=0)
    total_variance = jnp.sum(jnp.var(flat, axis=0, ddof=1))
    return jnp.sum((mean - exact.reshape(-1)) ** 2) / (total_variance / n)


def relative_variance(samples: jax.Array, exact: jax.Array) -> jax.Array:
    """``E‖J̃ − J‖² / ‖J‖²`` estimated from ``samples`` (N, S, P) and the exact ``J``."""
    errors = jnp.sum((samples - exact) ** 2, axis=tuple(range(1, samples.ndim)))
    return errors.mean() / jnp.sum(exact**2)
