"""Truncated BPTT against reverse mode with the carry cut ``k`` steps back, float64."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from online_learning import jit, online_grads

import rtrl_jax as rj

pytestmark = pytest.mark.x64  # float64 exactness checks

T = 12
INPUT = 2
HIDDEN = 4


@pytest.fixture(scope="module")
def problem():
    core = rj.from_linen(nn.GRUCell(HIDDEN), INPUT)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params, carry = core.init(keys[0], jnp.float64)
    xs = jax.random.normal(keys[1], (T, INPUT), jnp.float64)
    weights = jax.random.normal(keys[2], (T, HIDDEN), jnp.float64)
    return core, params, carry, xs, weights


def step_loss(out, w):
    return jnp.sum(jnp.tanh(out) * w)


def truncated_reference(core, params, carry, xs, weights, starts):
    """``d L_t/dθ`` for every ``t`` with the carry before step ``starts[t]`` held fixed."""

    def step_grad(t, start):
        def loss(p):
            def body(h, inputs):
                i, x = inputs
                h = jax.tree.map(lambda a: jnp.where(i == start, jax.lax.stop_gradient(a), a), h)
                return core(p, h, x)

            _, outs = jax.lax.scan(body, carry, (jnp.arange(T), xs))
            return step_loss(outs[t], weights[t])

        return jax.grad(loss)(params)

    return jit(jax.vmap(step_grad))(jnp.arange(T), jnp.asarray(starts))


def close(a, b):
    return all(
        jnp.allclose(x, y, rtol=1e-10, atol=1e-12)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_cuts_k_steps_back(problem, window):
    core, params, carry, xs, weights = problem
    grads = online_grads(core, rj.tbptt(core, window), params, carry, xs, weights, step_loss)
    starts = [max(0, t - window + 1) for t in range(T)]
    assert close(grads, truncated_reference(core, params, carry, xs, weights, starts))


def test_aligned_windows_cut_at_window_start(problem):
    core, params, carry, xs, weights = problem
    window = 4
    grads = online_grads(core, rj.tbptt(core, window, aligned=True), params, carry, xs, weights, step_loss)
    starts = [(t // window) * window for t in range(T)]
    assert close(grads, truncated_reference(core, params, carry, xs, weights, starts))


def test_window_of_sequence_length_is_full_bptt(problem):
    core, params, carry, xs, weights = problem
    grads = online_grads(core, rj.tbptt(core, T, aligned=True), params, carry, xs, weights, step_loss)
    targets = weights
    _, reference = rj.bptt_value_and_grad(
        core, lambda p, out, w: step_loss(out, w), params, carry, xs, targets
    )
    assert close(jax.tree.map(lambda g: g.sum(0), grads), reference)


@pytest.mark.parametrize("window", [0, -2, 1.5, True])
def test_invalid_window_is_rejected(problem, window):
    with pytest.raises(ValueError, match="window"):
        rj.tbptt(problem[0], window)
