"""Random signs read 32 to a random word: values, shapes, and independent uniform entries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtrl_jax._src.signs import random_signs


@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (33,), (3, 70)])
def test_signs_are_plus_minus_one_of_the_requested_shape_and_dtype(shape):
    signs = random_signs(jax.random.PRNGKey(0), shape, jnp.float32)
    assert signs.shape == shape and signs.dtype == jnp.float32
    assert set(np.unique(np.asarray(signs))) <= {-1.0, 1.0}


def test_signs_are_uniform_and_pairwise_uncorrelated():
    """Over N keys the mean of every entry and the correlation of every pair of entries are 0 with
    standard error 1/√N (±1 variables: variance 1); all must lie within 4.5 standard errors
    (about 7·10⁻⁶ per statistic for a correct generator; a shared or a fixed bit breaks it)."""
    n, size = 4000, 40  # 40 entries: two random words, the second one partly used
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    samples = jax.vmap(lambda k: random_signs(k, (size,), jnp.float32))(keys)
    samples = np.asarray(samples, np.float64)
    bound = 4.5 / np.sqrt(n)
    assert np.abs(samples.mean(0)).max() < bound
    correlation = samples.T @ samples / n
    off_diagonal = correlation[~np.eye(size, dtype=bool)]
    assert np.abs(off_diagonal).max() < bound
    # The test has power: a generator repeating its first word fails it.
    repeated = np.concatenate([samples[:, :32], samples[:, :8]], axis=1)
    repeated_corr = (repeated.T @ repeated / n)[~np.eye(size, dtype=bool)]
    assert np.abs(repeated_corr).max() > bound
