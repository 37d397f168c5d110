"""The Flax-style train state with the drop-in: a hand-written online loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rtrl_jax as rj
from rtrl_jax._src.train_state import RecurrentTrainState

pytestmark = pytest.mark.x64  # float64 exactness checks


def test_hand_written_loop_matches_online_grad_with_sgd():
    core = rj.from_linen(nn.GRUCell(4), 2)
    params, _ = core.init(jax.random.PRNGKey(0), jnp.float64)
    estimator = rj.rtrl(core)
    learning_rate = 0.1
    state = RecurrentTrainState.create(
        apply_fn=core,
        params=params,
        tx=optax.sgd(learning_rate),
        estimator=estimator,
        carry=core.initial_carry(jnp.float64),
    )
    step = rj.online_step(core, state.estimator)
    xs = jax.random.normal(jax.random.PRNGKey(1), (5, 2), jnp.float64)
    targets = jax.random.normal(jax.random.PRNGKey(2), (5, 4), jnp.float64)

    def loss(params, state, x, y):
        carry, out, trace = step(params, state.trace, state.carry, x, None)
        return jnp.sum((out - y) ** 2), (carry, trace)

    @jax.jit
    def train_step(state, x, y):
        (_, (carry, trace)), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state, x, y)
        return state.apply_gradients(grads=grads).replace(carry=carry, trace=trace)

    for x, y in zip(xs, targets, strict=True):
        state = train_step(state, x, y)

    # the same loop written out with estimator.step, online_grad and plain SGD
    manual, trace, carry = params, estimator.init(params, core.initial_carry(jnp.float64)), None
    carry = core.initial_carry(jnp.float64)
    for x, y in zip(xs, targets, strict=True):
        carry, out, trace = estimator.step(trace, manual, carry, x)
        grads = rj.online_grad(core, estimator, trace, manual, carry, 2 * (out - y))
        manual = jax.tree.map(lambda p, g: p - learning_rate * g, manual, grads)

    assert int(state.step) == 5
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(manual), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state.carry, carry, rtol=1e-12)
