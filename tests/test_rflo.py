"""RFLO / e-prop: the SnAp-1-shaped trace with the dynamics replaced by a leak."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from online_learning import add_task_loss, rollout

import rtrl_jax
from rtrl_jax._src.tasks import add_task_baselines


def _setup(core, steps=6):
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    carry = carry + 0.2
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, *core.input_shape), jnp.float64)
    return params, carry, xs


@pytest.mark.x64  # float64 references
def test_rflo_is_murrays_eligibility_trace():
    """For h' = α h + (1 - α) tanh(W h + U x + b): e_t[k, W_jk] = α e + (1 - α) φ'(z_k) h_j."""
    tau = 4.0
    cell = rtrl_jax.LeakyRNNCell(3, tau=tau)
    core = rtrl_jax.from_linen(cell, 2)
    params, carry, xs = _setup(core)
    alpha = 1.0 - 1.0 / tau
    estimator = rtrl_jax.rflo(core)  # the leak comes from the cell
    _, trace, influence = rollout(core, estimator, params, carry, xs)
    assert rtrl_jax.tree_size(trace) == core.num_params

    w = params["recurrent"]["kernel"]  # (in j, out k)
    u, b = params["input"]["kernel"], params["input"]["bias"]
    h = np.asarray(carry)
    e_w = np.zeros((3, 3))  # e_w[j, k] = trace of W[j, k] on unit k
    e_u = np.zeros((2, 3))
    e_b = np.zeros(3)
    for x in np.asarray(xs):
        z = h @ w + x @ u + b
        slope = (1 - alpha) * (1 - np.tanh(z) ** 2)
        e_w = alpha * e_w + h[:, None] * slope[None, :]
        e_u = alpha * e_u + x[:, None] * slope[None, :]
        e_b = alpha * e_b + slope
        h = alpha * h + (1 - alpha) * np.tanh(z)

    got = {}
    _, unravel = jax.flatten_util.ravel_pytree(params)
    for k in range(3):
        got[k] = unravel(influence[k])
        np.testing.assert_allclose(got[k]["recurrent"]["kernel"][:, k], e_w[:, k], atol=1e-12)
        np.testing.assert_allclose(got[k]["input"]["kernel"][:, k], e_u[:, k], atol=1e-12)
        np.testing.assert_allclose(got[k]["input"]["bias"][k], e_b[k], atol=1e-12)
        others = [i for i in range(3) if i != k]
        np.testing.assert_array_equal(got[k]["recurrent"]["kernel"][:, others], 0.0)


@pytest.mark.x64  # float64 references
def test_rflo_exact_when_dynamics_is_the_leak():
    """A cell whose D is exactly α·I: RFLO with that α is exact RTRL."""
    alpha = 0.7

    def apply(p, h, x):
        new = alpha * h + jnp.tanh(p["u"] @ x + p["b"])
        return new, new

    params = {"u": jnp.ones((3, 2)) * 0.3, "b": jnp.zeros(3)}
    core = rtrl_jax.from_function(apply, params=params, carry=jnp.zeros(3), input_shape=(2,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    carry = jnp.zeros(3, jnp.float64)
    xs = jax.random.normal(jax.random.PRNGKey(2), (5, 2), jnp.float64)
    _, _, got = rollout(core, rtrl_jax.rflo(core, alpha), params, carry, xs)
    _, _, exact = rollout(core, rtrl_jax.rtrl(core), params, carry, xs)
    np.testing.assert_allclose(got, exact, atol=1e-12)
    # The wrong leak is not exact.
    _, _, wrong = rollout(core, rtrl_jax.rflo(core, 0.2), params, carry, xs)
    assert float(jnp.max(jnp.abs(wrong - exact))) > 1e-3


@pytest.mark.x64  # float64 references
def test_leak_zero_is_the_immediate_jacobian():
    core = rtrl_jax.from_linen(nn.GRUCell(features=3), 2)
    params, carry, xs = _setup(core, steps=3)
    _, _, got = rollout(core, rtrl_jax.rflo(core, 0.0), params, carry, xs)
    _, _, immediate = rollout(core, rtrl_jax.tbptt(core, 1), params, carry, xs)
    np.testing.assert_allclose(got, immediate, atol=1e-12)


@pytest.mark.x64  # float64 references
def test_leak_per_carry_entry():
    core = rtrl_jax.from_linen(rtrl_jax.LeakyRNNCell(3, tau=2.0), 2)
    params, carry, xs = _setup(core)
    _, _, scalar = rollout(core, rtrl_jax.rflo(core, 0.5), params, carry, xs)
    _, _, vector = rollout(core, rtrl_jax.rflo(core, np.full(3, 0.5)), params, carry, xs)
    np.testing.assert_allclose(vector, scalar, atol=1e-14)
    _, _, mixed = rollout(core, rtrl_jax.rflo(core, np.array([0.5, 0.5, 0.1])), params, carry, xs)
    np.testing.assert_allclose(mixed[:2], scalar[:2], atol=1e-14)
    assert float(jnp.max(jnp.abs(mixed[2] - scalar[2]))) > 1e-4


def test_bad_leaks():
    gru = rtrl_jax.from_linen(nn.GRUCell(features=2), 2)
    with pytest.raises(ValueError, match="leak"):
        rtrl_jax.rflo(gru)
    with pytest.raises(ValueError, match="leak"):
        rtrl_jax.rflo(gru, 1.5)
    with pytest.raises(ValueError, match="values"):
        rtrl_jax.rflo(gru, np.full(5, 0.5))
    with pytest.raises(ValueError, match="leak"):
        rtrl_jax.make_estimator("rflo", gru)
    estimator = rtrl_jax.make_estimator("rflo", gru, leak=0.5)
    assert isinstance(estimator, rtrl_jax.Estimator)


def test_trainer_learns_add_task_with_rflo():
    core = rtrl_jax.from_linen(rtrl_jax.LeakyRNNCell(16, tau=2.0), 2)
    estimator = rtrl_jax.rflo(core)
    learned = add_task_loss(core, estimator)
    readout = add_task_loss(core, estimator, readout_only=True)
    no_memory = add_task_baselines()["no_memory"]
    assert learned < readout - 0.02, (learned, readout)
    assert learned < no_memory - 0.04, (learned, no_memory)
