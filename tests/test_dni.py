"""DNI: the synthetic gradient converges to the future gradient, the zero map is the immediate term,
every loop observes the cotangent alike, and learning the add task."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from online_learning import add_task_loss, check_trainer_keeps_learned_parts, online_grads

import rtrl_jax
from rtrl_jax._src.dni import dni, synthetic_gradient
from rtrl_jax._src.layers import build_online_core
from rtrl_jax._src.tasks import add_task_baselines

# The programs here are small and compiled once: XLA's backend optimisation costs more than it saves.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# A linear network whose future is fixed by its present: h_t = W h_{t-1} + U x_t with x_t = 0 and W
# two plane rotations (angles 0.9 and 2.1 rad), so the state keeps its norm and, started with weight
# in both planes, visits every direction (persistent excitation). Step loss ½‖P h_t‖².
PLANES = (0.9, 2.1)
READOUT = np.array([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
DISCOUNT = 0.5
START = np.array([0.6, 0.0, 0.0, 0.8])


def _rotations(scale: float = 1.0):
    blocks = [scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) for a in PLANES]
    w = np.zeros((4, 4))
    w[:2, :2], w[2:, 2:] = blocks
    return w


def _rotation_core(scale: float = 1.0):
    w = _rotations(scale)

    def apply(p, h, x):
        new = jnp.asarray(w, h.dtype) @ h + p["u"] @ x
        return new, new

    return rtrl_jax.from_function(
        apply, params={"u": jnp.zeros((4, 1))}, carry=jnp.zeros(4), input_shape=(1,), name="rotations"
    )


def _readout_loss(out):
    return 0.5 * jnp.sum((jnp.asarray(READOUT, out.dtype) @ out) ** 2)


def _future_gradient_map() -> np.ndarray:
    """``M`` with ``f_t = M h_t``: ``M = Σ_{k≥1} λ^{k-1} (Wᵀ)^k PᵀP W^k``, the solution of the Stein
    equation ``M = Wᵀ PᵀP W + λ Wᵀ M W`` (row-major ``vec(Wᵀ M W) = (Wᵀ ⊗ Wᵀ) vec(M)``)."""
    w, c = _rotations(), READOUT.T @ READOUT
    vec = np.linalg.solve(np.eye(16) - DISCOUNT * np.kron(w.T, w.T), (w.T @ c @ w).ravel())
    return vec.reshape(4, 4)


def _bptt_future_gradient(core, params, carry, horizon: int = 120):
    """``∂/∂h_t Σ_{k=1..K} λ^{k-1} L_{t+k}`` by ``jax.grad`` through ``lax.scan`` (``λ^K`` < 1e-36)."""

    def future_loss(h):
        _, outs = jax.lax.scan(lambda h, x: core(params, h, x), h, jnp.zeros((horizon, 1)))
        weights = DISCOUNT ** jnp.arange(horizon)
        return jnp.sum(weights * jax.vmap(_readout_loss)(outs))

    return jax.grad(future_loss)(carry)


@pytest.mark.x64
def test_synthetic_gradient_converges_to_the_future_gradient():
    """From A = 0, b = 0 the bootstrapped map converges geometrically to the future gradient: A to
    the Stein solution M (closed form), b to 0, and A h_T + b equals BPTT's future gradient at the
    final state to 1e-10. The error's decay is geometric at one rate (measured over two windows),
    so 1e-10 is reached well inside the run (the rate puts the final error near rounding)."""
    core = _rotation_core()
    params = {"u": jnp.zeros((4, 1))}
    target = _future_gradient_map()
    estimator = dni(core, synthetic_learning_rate=1.0, discount=DISCOUNT)  # step 1 / (1 + ‖h‖²) = 0.5
    steps = 3000

    def emit(h, out, trace):
        return jnp.linalg.norm(trace.weights - target) / np.linalg.norm(target)

    run = jit(
        lambda: rtrl_jax.rollout(
            estimator,
            params,
            jnp.asarray(START),
            jnp.zeros((steps, 1)),
            emit=emit,
            cotangent=lambda h, out: jax.grad(_readout_loss)(out),
        )
    )
    carry, trace, errors = run()
    errors = np.asarray(errors)
    # geometric decay: the same rate over [500, 1000] and [1000, 1500] (within 20 %)
    rates = [np.log(errors[b] / errors[a]) / (b - a) for a, b in ((500, 1000), (1000, 1500))]
    assert rates[0] < 0 and abs(rates[1] / rates[0] - 1) < 0.2, rates
    assert errors[-1] <= 1e-10, errors[-1]
    assert float(jnp.linalg.norm(trace.bias)) <= 1e-10
    synthetic = synthetic_gradient(trace.weights, trace.bias, trace.carry)
    reference = _bptt_future_gradient(core, params, carry)
    assert float(jnp.linalg.norm(synthetic - reference) / jnp.linalg.norm(reference)) <= 1e-10


@pytest.mark.x64
def test_undiscounted_bias_follows_the_td_recursion_to_the_future_gradient():
    """λ = 1 on a network at rest (h = 0, x = 0, contracting W = 0.8 · rotations) with the linear
    loss ``gᵀ h_t``: every future loss has gradient ``g``, so the future gradient is the constant
    ``f = Σ_{k≥1} (Wᵀ)^k g = (I - Wᵀ)^{-1} Wᵀ g``. A stays 0 (its update is ``e hᵀ``, h = 0) and b
    follows the TD recursion ``b_t = f + (I - η (I - Wᵀ))^t (b_0 - f)`` exactly (checked at every
    step, 1e-12), reaching BPTT's undiscounted future gradient (1e-10)."""
    scale, rate, steps = 0.8, 0.5, 300
    core = _rotation_core(scale)
    w = _rotations(scale)
    params = {"u": jnp.zeros((4, 1))}
    g = np.array([1.0, -0.5, 0.25, 2.0])
    future = np.linalg.solve(np.eye(4) - w.T, w.T @ g)
    contraction = np.eye(4) - rate * (np.eye(4) - w.T)
    # from b_0 = 0: b_t = f - C^t f after t observations
    expected = np.stack([future - np.linalg.matrix_power(contraction, t) @ future for t in range(steps)])

    estimator = dni(core, synthetic_learning_rate=rate, discount=1.0)
    run = jit(
        lambda: rtrl_jax.rollout(
            estimator,
            params,
            jnp.zeros(4),
            jnp.zeros((steps, 1)),
            emit=lambda h, out, trace: trace.bias,
            cotangent=lambda h, out: jnp.asarray(g),
        )
    )
    _, trace, biases = run()
    # emit runs before observe: the bias emitted at step t has seen t observations
    np.testing.assert_allclose(np.asarray(biases), expected, rtol=0, atol=1e-12)
    assert float(jnp.abs(trace.weights).max()) == 0.0

    def future_loss(h, horizon=200):  # 0.8^200 < 1e-19
        _, outs = jax.lax.scan(lambda h, x: core(params, h, x), h, jnp.zeros((horizon, 1)))
        return jnp.sum(outs @ jnp.asarray(g))

    reference = jax.grad(future_loss)(jnp.zeros(4))
    assert float(jnp.linalg.norm(trace.bias - reference) / jnp.linalg.norm(reference)) <= 1e-10


@pytest.mark.x64
def test_zero_map_is_the_immediate_term_of_truncated_bptt():
    """With the map frozen at its zero start, DNI's gradient is ``c_t · I_t``: TBPTT with a window of
    one step, to rounding (float64, a GRU)."""
    core = rtrl_jax.from_linen(nn.GRUCell(3), 2)
    params, _ = core.init(jax.random.PRNGKey(0), jnp.float64)
    carry = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (3,))
    xs = jax.random.normal(jax.random.PRNGKey(2), (6, 2))
    weights = jax.random.normal(jax.random.PRNGKey(3), (6, 3))

    def step_loss(out, w):
        return jnp.sum(jnp.sin(out) * w)

    got = online_grads(core, dni(core, synthetic_learning_rate=0.0), params, carry, xs, weights, step_loss)
    immediate = online_grads(core, rtrl_jax.tbptt(core, 1), params, carry, xs, weights, step_loss)
    got, immediate = ravel_pytree(got)[0], ravel_pytree(immediate)[0]
    assert float(jnp.linalg.norm(got - immediate) / jnp.linalg.norm(immediate)) <= 1e-12


def test_every_loop_observes_the_cotangent_alike():
    """The comparison tool, the trainer (learning rate 0) and ``rollout(cotangent=)`` show each
    step's cotangent to the trace as a hand-written loop does (step, grad, observe): the same
    per-step gradients and the same learned map, moved off its zero start."""
    core = rtrl_jax.from_linen(nn.SimpleCell(3), 2)
    params, carry = core.init(jax.random.PRNGKey(0))
    estimator = rtrl_jax.make_estimator("dni", core, synthetic_learning_rate=0.1)
    steps = 8
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, 2))
    targets = jax.nn.one_hot(jnp.arange(steps) % 2, 2)
    head = rtrl_jax.linear_head()
    head_params = head.init(jax.random.PRNGKey(2), 3, 2)

    def loss(out, target):
        return rtrl_jax.softmax_cross_entropy(head.apply(head_params, out), target)

    def by_hand(step_loss, targets):
        def body(state, step):
            h, trace = state
            x, target = step
            h, out, trace = estimator.step(trace, params, h, x)
            c = rtrl_jax.carry_cotangent(core, h, jax.grad(step_loss)(out, target))
            grad = ravel_pytree(estimator.grad(trace, params, c))[0]
            return (h, estimator.observe(trace, params, c)), grad

        (_, trace), grads = jax.lax.scan(body, (carry, estimator.init(params, carry)), (xs, targets))
        return trace.weights, grads

    weights, grads = jit(by_hand, static_argnums=0)(loss, targets)
    assert float(jnp.abs(weights).max()) > 1e-3

    compared = jit(
        lambda: rtrl_jax.gradient_trajectory(
            core,
            {"dni": estimator},
            rtrl_jax.rtrl(core),
            params,
            carry,
            xs,
            targets,
            loss,
            key=jax.random.PRNGKey(3),
        )
    )()
    np.testing.assert_allclose(compared.grads["dni"], grads, rtol=1e-5, atol=1e-7)

    optimizer = optax.sgd(0.0)
    state = rtrl_jax.init_train_state(
        core, estimator, optimizer, params, head_params, batch_size=1, key=jax.random.PRNGKey(4)
    )
    stream = rtrl_jax.Stream(  # one stream: leading axis batch, then time
        inputs=xs[None], targets=targets[None], mask=jnp.ones((1, steps)), reset=jnp.zeros((1, steps), bool)
    )
    state, _ = rtrl_jax.train_online(core, estimator, optimizer, stream, state, chunk_size=steps)
    np.testing.assert_allclose(state.trace.weights[0], weights, rtol=1e-5, atol=1e-7)

    def sine_loss(out, target):  # reads the output only: rollout's cotangent gets no targets
        del target
        return jnp.sum(jnp.sin(out))

    sine_weights, _ = jit(by_hand, static_argnums=0)(sine_loss, targets)
    rolled = jit(
        lambda: rtrl_jax.rollout(
            estimator,
            params,
            carry,
            xs,
            cotangent=lambda h, out: rtrl_jax.carry_cotangent(core, h, jax.grad(sine_loss)(out, None)),
        )[1]
    )()
    np.testing.assert_allclose(rolled.weights, sine_weights, rtol=1e-5, atol=1e-7)


@pytest.mark.x64
def test_trainer_keeps_the_learned_map_across_episodes():
    """At an episode start the trainer restarts the last carries and input as ``init`` does and
    keeps ``A`` and ``b``, which go on learning in the next episode."""
    core = rtrl_jax.from_linen(nn.SimpleCell(3), 2)
    estimator = rtrl_jax.make_estimator("dni", core, synthetic_learning_rate=0.1)
    check_trainer_keeps_learned_parts(core, estimator, ("weights", "bias"))


def test_narrower_trace_dtype_keeps_observe_and_restart():
    """``trace_dtype=`` wraps DNI's ``observe`` and ``restart`` too: the stored map learns (in
    ``bfloat16``) and survives a restart; the online layers still refuse it."""
    core = rtrl_jax.from_linen(nn.SimpleCell(3), 2)
    estimator = rtrl_jax.make_estimator("dni", core, synthetic_learning_rate=0.5, trace_dtype="bfloat16")
    params, carry = core.init(jax.random.PRNGKey(0))

    @jit
    def two_steps(trace, h):
        for x in jnp.ones((2, 2)):
            h, _, trace = estimator.step(trace, params, h, x)
            trace = estimator.observe(trace, params, jnp.ones(3))
        return trace, estimator.restart(trace, params, carry)

    trace, restarted = two_steps(estimator.init(params, carry), carry)
    assert trace.weights.dtype == jnp.bfloat16
    assert float(jnp.abs(trace.weights.astype(jnp.float32)).max()) > 0
    np.testing.assert_array_equal(restarted.weights, trace.weights)
    np.testing.assert_array_equal(restarted.bias, trace.bias)
    np.testing.assert_array_equal(restarted.previous_carry, jnp.zeros(3, jnp.bfloat16))
    assert restarted.input.dtype == trace.input.dtype
    with pytest.raises(ValueError, match="observe"):
        build_online_core("rnn0", core, "dni", {"trace_dtype": "bfloat16"})


def test_options():
    core = _rotation_core()
    for bad in ({"synthetic_learning_rate": -1.0}, {"discount": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dni(core, **bad)
    with pytest.raises(ValueError, match="input_spec"):
        dni(lambda p, h, x: (h, h))
    info = rtrl_jax.get_estimator_info("dni")
    assert not info.needs_key and not info.exact_for(core)
    assert rtrl_jax.rtrl(core).observe is rtrl_jax.Estimator(None, None, None).observe


@pytest.mark.slow
def test_trainer_learns_add_task_with_dni():
    core = rtrl_jax.from_linen(rtrl_jax.LeakyRNNCell(16, tau=2.0), 2)
    estimator = dni(core, synthetic_learning_rate=0.03)
    learned = add_task_loss(core, estimator)
    readout = add_task_loss(core, estimator, readout_only=True)
    no_memory = add_task_baselines()["no_memory"]
    assert learned < no_memory - 0.04, (learned, no_memory)
    assert learned < readout - 0.02, (learned, readout)


def test_online_layers_refuse_an_estimator_that_observes():
    """A layer's drop-in step cannot show its trace the cotangent, so a layer refuses DNI by name."""
    core = rtrl_jax.from_linen(nn.SimpleCell(3), 2)
    with pytest.raises(ValueError, match=r"online layer 'rnn0': estimator 'dni' learns .*observe"):
        build_online_core("rnn0", core, "dni", {})
