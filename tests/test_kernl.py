"""KeRNL: the learned kernel and sensitivity, the RFLO limit, and learning the add task."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from online_learning import add_task_loss, check_trainer_keeps_learned_parts

import rtrl_jax
from rtrl_jax._src.kernl import kernel_update, kernl
from rtrl_jax._src.layers import build_online_core, init_streams, step_streams
from rtrl_jax._src.tasks import add_task_baselines

# The programs here are small and compiled once: XLA's backend optimisation costs more than it saves.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
DECAYS = np.array([0.3, 0.6, 0.85])  # the per-unit exponential of the diagonal network below


def _diagonal_core():
    """``h_t = d ⊙ h_{t-1} + tanh(U x_t + b)``: ``∂h_t/∂h_{t'} = diag(d)^{t-t'}`` exactly."""
    decays = jnp.asarray(DECAYS)

    def apply(p, h, x):
        new = decays.astype(h.dtype) * h + jnp.tanh(p["u"] @ x + p["b"])
        return new, new

    params = {"u": jnp.full((3, 2), 0.3), "b": jnp.zeros(3)}
    return rtrl_jax.from_function(apply, params=params, carry=jnp.zeros(3), input_shape=(2,), name="diag")


@pytest.mark.x64
def test_kernel_recovers_per_unit_decay_rates_and_then_is_exact():
    """On a network whose state sensitivity is a per-unit exponential, the perturbation learning
    drives γ to -log d and β to I from a wrong start, and then β E_t is the exact influence."""
    core = _diagonal_core()
    params = {"u": jax.random.normal(jax.random.PRNGKey(0), (3, 2)), "b": jnp.full(3, 0.1)}
    carry = jnp.zeros(3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (4000, 2))
    estimator = kernl(core, kernel_learning_rate=0.02, initial_decay_rate=1.0)
    wrong = jnp.eye(3) + 0.2 * jax.random.normal(jax.random.PRNGKey(2), (3, 3))

    def init(params, carry, *, key=None):
        return estimator.init(params, carry, key=key)._replace(sensitivity=wrong)

    started_wrong = estimator._replace(init=init)

    @jit
    def run(params, carry, xs, key):
        carry, trace, _ = rtrl_jax.rollout(started_wrong, params, carry, xs, key=key)
        exact = rtrl_jax.rtrl(core)
        _, exact_trace, _ = rtrl_jax.rollout(exact, params, jnp.zeros(3), xs)
        return (
            trace,
            rtrl_jax.influence_matrix(started_wrong, trace, params, carry),
            rtrl_jax.influence_matrix(exact, exact_trace, params, carry),
        )

    trace, influence, exact = run(params, carry, xs, jax.random.PRNGKey(3))
    np.testing.assert_allclose(trace.decay_rate, -np.log(DECAYS), rtol=1e-3)
    np.testing.assert_allclose(trace.sensitivity, np.eye(3), atol=1e-3)
    error = np.linalg.norm(influence - exact) / np.linalg.norm(exact)
    assert error < 1e-3, error


@pytest.mark.x64
def test_frozen_identity_sensitivity_is_rflo():
    """With η = 0, β stays I and KeRNL is RFLO with leak exp(-γ_0); an LSTM's pytree carry and
    parameters that move two carry entries (the compressed trace)."""
    core = rtrl_jax.from_linen(nn.LSTMCell(3), 2)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    carry = jax.tree.map(lambda c: c + 0.3, carry)
    xs = jax.random.normal(jax.random.PRNGKey(1), (6, 2), jnp.float64)
    frozen = kernl(core, kernel_learning_rate=0.0, initial_decay_rate=0.7)
    leaky = rtrl_jax.rflo(core, float(np.exp(-0.7)))

    @jit
    def run(params, carry, xs):
        out = []
        for estimator, key in ((frozen, jax.random.PRNGKey(2)), (leaky, None)):
            final, trace, _ = rtrl_jax.rollout(estimator, params, carry, xs, key=key)
            out.append(rtrl_jax.influence_matrix(estimator, trace, params, final))
        return out

    got, expected = run(params, carry, xs)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_learning_the_kernel_aligns_the_gradient_with_rtrl():
    """On a leaky RNN (whose sensitivity is not a per-unit exponential), the learned β, γ give
    online gradients better aligned with exact RTRL's than the frozen start (β = I, γ = γ_0)."""
    core = rtrl_jax.from_linen(rtrl_jax.LeakyRNNCell(8, tau=2.0), 2)
    params, carry = core.init(jax.random.PRNGKey(0))
    xs = jax.random.normal(jax.random.PRNGKey(1), (4000, 2))
    readout = jax.random.normal(jax.random.PRNGKey(2), (8,))

    def cosines(estimator, exact_grads, key):
        def emit(carry, out, trace):
            return ravel_pytree(estimator.grad(trace, params, readout * carry))[0]

        grads = rtrl_jax.rollout(estimator, params, carry, xs, key=key, emit=emit)[2]
        return (
            jnp.sum(grads * exact_grads, -1)
            / jnp.linalg.norm(grads, axis=-1)
            / jnp.linalg.norm(exact_grads, axis=-1)
        )

    exact = rtrl_jax.rtrl(core)
    frozen_kernl, learning_kernl = (
        kernl(core, kernel_learning_rate=0.0),
        kernl(core, kernel_learning_rate=1e-3),
    )

    @jit
    def run(key):
        exact_grads = rtrl_jax.rollout(
            exact,
            params,
            carry,
            xs,
            emit=lambda h, out, trace: ravel_pytree(exact.grad(trace, params, readout * h))[0],
        )[2]
        frozen = cosines(frozen_kernl, exact_grads, key)
        learned = cosines(learning_kernl, exact_grads, key)
        return jnp.mean(frozen[-500:]), jnp.mean(learned[-500:])

    frozen, learned = run(jax.random.PRNGKey(3))
    assert learned > frozen + 0.05, (frozen, learned)


def test_kernel_update_is_sgd_on_the_prediction_loss():
    """β and γ move along minus the gradient of ½‖β ω_t(γ) - δ‖², ω_t = exp(-γ) ω_{t-1} + ξ, with
    Γ = ∂ω_{t-1}/∂γ carried in (here ω_{t-1} is taken as a fixed input, so Γ_{t-1} = 0)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    beta = jnp.eye(3) + 0.1 * jax.random.normal(keys[0], (3, 3))
    gamma = jnp.array([0.2, 0.5, 1.0])
    omega, noise, response = (jax.random.normal(k, (3,)) for k in keys[1:])

    def loss(beta, gamma):
        return 0.5 * jnp.sum((beta @ (jnp.exp(-gamma) * omega + noise) - response) ** 2)

    beta_bar, gamma_bar = jit(jax.grad(loss, argnums=(0, 1)))(beta, gamma)
    update = jit(kernel_update, static_argnums=6)(beta, gamma, omega, jnp.zeros(3), noise, response, 0.01)
    np.testing.assert_allclose(update.sensitivity, beta - 0.01 * beta_bar, rtol=1e-5)
    np.testing.assert_allclose(update.decay_rate, gamma - 0.01 * gamma_bar, rtol=1e-5)
    np.testing.assert_allclose(update.loss, loss(beta, gamma), rtol=1e-5)


@pytest.mark.x64
def test_trainer_keeps_the_learned_kernel_across_episodes():
    """At an episode start the trainer restarts the eligibility trace, the shadow and the noise
    traces as ``init`` does and keeps ``β`` and ``γ``, which go on learning in the next episode."""
    core = rtrl_jax.from_linen(nn.SimpleCell(3), 2)
    estimator = rtrl_jax.make_estimator("kernl", core, kernel_learning_rate=0.1, noise_scale=1e-2)
    check_trainer_keeps_learned_parts(core, estimator, ("sensitivity", "decay_rate"))


@pytest.mark.x64
def test_online_layer_keeps_the_learned_kernel_at_an_episode_start():
    """``step_streams`` restarts a stream that starts an episode (its carry and eligibility trace
    as a fresh stream's, its ``β`` and ``γ`` as they were) and steps the others on; ``η = 0`` keeps
    ``β``, ``γ`` fixed through the step, and the carry and eligibility trace do not depend on the
    noise, so both streams are compared with ``step`` of the trace they should start from."""
    core = rtrl_jax.from_linen(nn.SimpleCell(3), 2)
    online = build_online_core("rnn0", core, "kernl", {"kernel_learning_rate": 0.0})
    estimator = online.estimator
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    carries, traces = init_streams(online, params, 2, jnp.float64, jax.random.PRNGKey(1))
    xs = jax.random.normal(jax.random.PRNGKey(2), (2, 2), jnp.float64)
    step = jit(
        lambda traces, carries, reset, key: step_streams(online, params, traces, carries, xs, reset, key)
    )
    carries, _, traces = step(traces, carries, jnp.array([False, False]), jax.random.PRNGKey(3))
    learned = traces._replace(
        sensitivity=traces.sensitivity + 0.1 * jnp.arange(9.0).reshape(3, 3),
        decay_rate=traces.decay_rate * jnp.array([[0.5], [2.0]]),
    )
    got = step(learned, carries, jnp.array([True, False]), jax.random.PRNGKey(4))

    def stream(tree, b):
        return jax.tree.map(lambda a: a[b], tree)

    restarted = estimator.init(params, carry)._replace(
        sensitivity=learned.sensitivity[0], decay_rate=learned.decay_rate[0]
    )
    starts = [(restarted, carry), (stream(learned, 1), stream(carries, 1))]
    one = jit(lambda trace, h, x: estimator.step(trace, params, h, x, key=jax.random.PRNGKey(5)))
    for b, (trace, h) in enumerate(starts):
        want_carry, _, want = one(trace, h, xs[b])
        got_carry, got_trace = stream(got[0], b), stream(got[2], b)
        np.testing.assert_array_equal(got_trace.sensitivity, trace.sensitivity)
        np.testing.assert_array_equal(got_trace.decay_rate, trace.decay_rate)
        np.testing.assert_allclose(got_carry, want_carry, rtol=1e-12)
        for g, w in zip(
            jax.tree.leaves(got_trace.eligibility), jax.tree.leaves(want.eligibility), strict=True
        ):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


def test_options_and_key():
    core = _diagonal_core()
    for bad in ({"kernel_learning_rate": -1.0}, {"noise_scale": 0.0}, {"initial_decay_rate": -0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            kernl(core, **bad)
    info = rtrl_jax.get_estimator_info("kernl")
    assert info.needs_key and not info.exact_for(core)
    estimator = rtrl_jax.make_estimator("kernl", core)
    params, carry = core.init(jax.random.PRNGKey(0))
    trace = estimator.init(params, carry)
    with pytest.raises(ValueError, match="key"):
        estimator.step(trace, params, carry, jnp.ones(2))
    plain = lambda p, h, x: (h, h)  # noqa: E731 - a bare function has no specs for I's pattern
    assert info.unsupported_reason(plain) is not None
    with pytest.raises(ValueError, match="cannot serve"):
        rtrl_jax.make_estimator("kernl", plain)


@pytest.mark.slow
def test_trainer_learns_add_task_with_kernl():
    core = rtrl_jax.from_linen(rtrl_jax.LeakyRNNCell(16, tau=2.0), 2)
    estimator = kernl(core, kernel_learning_rate=1e-3, noise_scale=1e-2)
    learned = add_task_loss(core, estimator)
    readout = add_task_loss(core, estimator, readout_only=True)
    no_memory = add_task_baselines()["no_memory"]
    assert learned < no_memory - 0.04, (learned, no_memory)
    assert learned < readout - 0.02, (learned, readout)
