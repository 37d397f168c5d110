"""Shared by the tests: per-step online gradients of a step loss, and an online run on the add task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rtrl_jax

# The test programs are compiled once each and run on a few small steps: XLA's backend optimisation
# would cost more compile time than it saves.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def jit(fn, **kwargs):
    """``jax.jit`` with the tests' :data:`COMPILER_OPTIONS`."""
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)


def online_grads(core, estimator, params, carry, xs, weights, step_loss):
    """Per-step online gradients of ``step_loss(out_t, weights_t)`` (leading axis time), jitted."""

    def body(state, inputs):
        trace, h = state
        x, w = inputs
        h, out, trace = estimator.step(trace, params, h, x)
        out_bar = jax.grad(step_loss)(out, w)
        return (trace, h), rtrl_jax.online_grad(core, estimator, trace, params, h, out_bar)

    run = jit(lambda: jax.lax.scan(body, (estimator.init(params, carry), carry), (xs, weights))[1])
    return run()


def rollout(core, estimator, params, carry, xs):
    """``(carry, trace, influence)`` after running ``estimator`` over ``xs`` (jitted scan)."""

    @jit
    def go(params, carry, xs):
        def body(state, x):
            carry, trace = state
            carry, _, trace = estimator.step(trace, params, carry, x)
            return (carry, trace), None

        return jax.lax.scan(body, (carry, estimator.init(params, carry)), xs)[0]

    carry, trace = go(params, carry, xs)
    return carry, trace, rtrl_jax.influence_matrix(estimator, trace, params, carry)


def frozen(core):
    """An estimator without a trace whose gradient is zero: the core stays as initialised."""
    return rtrl_jax.Estimator(
        init=lambda params, carry, *, key=None: (),
        step=lambda trace, params, carry, x, *, key=None: (*core(params, carry, x), ()),
        grad=lambda trace, params, carry_bar: jax.tree.map(jnp.zeros_like, params),
    )


def add_task_loss(core, estimator, *, readout_only=False, steps=3000, batch=16, seed=0):
    """Mean step loss over the last fifth of an online run on the add task (t1=5, t2=9).

    ``readout_only``: only the head learns, the core stays as initialised. That loss does not
    depend on the estimator (the core's gradients are dropped), so it is computed once per core
    configuration with :func:`frozen` and shared by the tests."""
    if readout_only:
        key = (repr(core.module), core.input_shape, steps, batch, seed, jax.config.jax_enable_x64)
        return _readout_only_loss(key, core, steps, batch, seed)
    return _add_task_loss(core, estimator, False, steps, batch, seed)


_READOUT_ONLY = {}


def _readout_only_loss(key, core, steps, batch, seed):
    if key not in _READOUT_ONLY:
        _READOUT_ONLY[key] = _add_task_loss(core, frozen(core), True, steps, batch, seed)
    return _READOUT_ONLY[key]


def _add_task_loss(core, estimator, readout_only, steps, batch, seed):
    params, _ = core.init(jax.random.PRNGKey(seed))
    head = rtrl_jax.linear_head()
    head_params = head.init(jax.random.PRNGKey(seed + 1), core.output(core.initial_carry()).shape[0], 2)
    optimizer = optax.adam(3e-3)
    if readout_only:
        optimizer = optax.multi_transform(
            {"core": optax.set_to_zero(), "head": optax.adam(3e-3)}, {"core": "core", "head": "head"}
        )
    state = rtrl_jax.init_train_state(
        core, estimator, optimizer, params, head_params, batch_size=batch, key=jax.random.PRNGKey(2)
    )
    stream = rtrl_jax.sample_batch(rtrl_jax.add_task(5, 9), jax.random.PRNGKey(seed + 3), steps, batch)
    _, metrics = rtrl_jax.train_online(core, estimator, optimizer, stream, state, chunk_size=steps)
    loss = metrics.loss / metrics.weight
    return float(np.mean(loss[-steps // 5 :]))
