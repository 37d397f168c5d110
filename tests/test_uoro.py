"""Statistical tests of the stochastic estimators (UORO, KF-RTRL, r-OK) against exact RTRL.

On a fixed trajectory (learning rate 0, float64) an unbiased estimator's final influence has mean
``J_T``. The statistic ``R = ‖mean − J‖² / (tr Σ̂ / N)`` is then a weighted mean of ``χ²_1``
variables, whose upper tail is no heavier than a single ``χ²_1``: ``R ≤ 4² = 16`` is the acceptance
region of a two-sided ``z``-test at ``|z| ≤ 4`` (false rejection ≤ 6.3e-5 per check). A deliberately
biased variant is rejected by the same test, so the test has power.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import rtrl_jax
from rtrl_jax._src import estimator_stats
from rtrl_jax._src import uoro as uoro_module
from rtrl_jax._src.kf_rtrl import kf_merge
from rtrl_jax._src.kronecker import kronecker_estimator

pytestmark = pytest.mark.x64  # float64 exactness checks

Z = 4.0
STEPS = 8
CELLS = {"tanh_rnn": lambda: nn.SimpleCell(features=5), "gru": lambda: nn.GRUCell(features=4)}


# Compile time is nearly all of these tests' cost: the sampling programs are compiled with XLA's
# backend optimisation off (it would cost more than it saves on 1000 samples of 8 small steps).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.cache
def _trajectory(cell_name, input_size=3, seed=0):
    """A fixed trajectory of ``CELLS[cell_name]`` and its exact influence (once per session)."""
    core = rtrl_jax.from_linen(CELLS[cell_name](), input_size)
    params, carry = core.init(jax.random.PRNGKey(seed), dtype=jnp.float64)
    inputs = jax.random.normal(jax.random.PRNGKey(seed + 1), (STEPS, input_size), jnp.float64)
    exact = estimator_stats.final_influence(rtrl_jax.rtrl(core), params, carry, inputs, jax.random.PRNGKey(0))
    return core, params, carry, inputs, exact


def _samples(estimator, params, carry, inputs, num, seed=7):
    keys = jax.random.split(jax.random.PRNGKey(seed), num)
    sample = jax.jit(
        lambda k: estimator_stats.sample_final_influences(estimator, params, carry, inputs, k),
        compiler_options=COMPILER_OPTIONS,
    )
    return sample(keys)


ESTIMATORS = {
    "uoro": lambda core: rtrl_jax.uoro(core),
    "kf": lambda core: rtrl_jax.kf_rtrl(core),
    "ok1": lambda core: rtrl_jax.ok(core, rank=1),
    "ok2": lambda core: rtrl_jax.ok(core, rank=2),
}


# 1000 samples per case: the GRU cases (its explicit D_t path is also checked against the per-row
# one in test_kronecker.py) run under -m slow.
@pytest.mark.parametrize("cell_name", ["tanh_rnn", pytest.param("gru", marks=pytest.mark.slow)])
@pytest.mark.parametrize("estimator_name", sorted(ESTIMATORS))
def test_unbiased_on_fixed_trajectory(cell_name, estimator_name):
    core, params, carry, inputs, exact = _trajectory(cell_name)
    samples = _samples(ESTIMATORS[estimator_name](core), params, carry, inputs, 1000)
    assert jnp.all(jnp.isfinite(samples))
    for n in (100, 1000):
        ratio = float(estimator_stats.mean_error_ratio(samples[:n], exact))
        assert ratio <= Z**2, (cell_name, estimator_name, n, ratio)
    # The estimates are genuinely random (a zero-variance estimator would make the ratio vacuous).
    assert float(estimator_stats.relative_variance(samples, exact)) > 1e-6


def test_z_test_rejects_a_biased_estimator():
    """KF whose immediate term is scaled by 1.5 is biased; the same test rejects it."""
    core, params, carry, inputs, exact = _trajectory("tanh_rnn")

    def biased_merge(u, a, key):
        return kf_merge(u, a.at[1].multiply(1.5), jax.random.rademacher(key, (2,), dtype=u.dtype))

    biased = kronecker_estimator(core, rank=1, reduce=biased_merge, name="biased KF")
    samples = _samples(biased, params, carry, inputs, 1000)
    assert float(estimator_stats.mean_error_ratio(samples, exact)) > 4 * Z**2


def test_uoro_factors_and_gradient():
    core, params, carry, inputs, _ = _trajectory("gru")
    est = rtrl_jax.uoro(core)
    trace = est.init(params, carry)
    assert trace.carry_factor.shape == (core.carry_size,)
    assert jax.tree.structure(trace.params_factor) == jax.tree.structure(params)
    factor = jax.flatten_util.ravel_pytree(trace.params_factor)[0]
    assert factor.shape == (core.num_params,) and float(jnp.abs(factor).max()) == 0.0
    new_carry, out, trace = est.step(trace, params, carry, inputs[0], key=jax.random.PRNGKey(3))
    bar = jax.random.normal(jax.random.PRNGKey(4), new_carry.shape, jnp.float64)
    grads = est.grad(trace, params, bar)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    flat = jax.flatten_util.ravel_pytree(grads)[0]
    expected = jnp.dot(trace.carry_factor, bar) * jax.flatten_util.ravel_pytree(trace.params_factor)[0]
    assert jnp.allclose(flat, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="key"):
        est.step(trace, params, new_carry, inputs[1])


def test_uoro_serves_plain_function_cores():
    def apply(params, carry, x):
        new = jnp.tanh(params["w"] @ carry + params["u"] @ x)
        return new, new

    params = {"w": 0.5 * jnp.eye(3), "u": jnp.ones((3, 2))}
    core = rtrl_jax.from_function(apply, params=params, carry=jnp.zeros(3), input_shape=(2,))
    est = rtrl_jax.make_estimator("uoro", core, epsilon=1e-6)
    trace = est.init(params, jnp.zeros(3))
    carry, _, trace = est.step(trace, params, jnp.zeros(3), jnp.ones(2), key=jax.random.PRNGKey(0))
    assert carry.shape == (3,)
    assert jax.tree.map(jnp.shape, trace.params_factor) == {"w": (3, 3), "u": (3, 2)}


@pytest.mark.parametrize("cell_name", ["tanh_rnn", pytest.param("gru", marks=pytest.mark.slow)])
def test_factored_dense_kernels_equal_the_plain_reverse_pass(cell_name):
    """On a linen cell each Dense kernel's ``ν̄`` is kept as its factors ``a ⊗ g`` (norm
    ``‖a‖‖g‖``); the same cell as a plain function takes one reverse pass over all parameters.
    Over 20 steps with the same keys both give the same trace to float64 rounding."""
    shape = (3,)
    core = rtrl_jax.from_linen(CELLS[cell_name](), shape[0])
    params, carry = core.init(jax.random.PRNGKey(0), dtype=jnp.float64)
    plain = rtrl_jax.from_function(core.apply, params=params, carry=carry, input_shape=shape)
    assert uoro_module._dense_layout(core) is not None and uoro_module._dense_layout(plain) is None
    inputs = jax.random.normal(jax.random.PRNGKey(5), (20, *shape), jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(6), 20)

    def run(est):
        def body(state, x_and_key):
            trace, h = state
            x, key = x_and_key
            h, _, trace = est.step(trace, params, h, x, key=key)
            return (trace, h), None

        (trace, _), _ = jax.lax.scan(body, (est.init(params, carry), carry), (inputs, keys))
        return trace

    estimators = (rtrl_jax.uoro(core), rtrl_jax.uoro(plain))
    factored, reference = jax.jit(lambda: tuple(map(run, estimators)), compiler_options=COMPILER_OPTIONS)()
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(reference))
    assert scale > 1e-3  # the factors are not all zero
    for got, want in zip(jax.tree.leaves(factored), jax.tree.leaves(reference), strict=True):
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-12 * scale
