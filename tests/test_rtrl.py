"""Exact RTRL against BPTT (``jax.grad`` through ``lax.scan``), float64."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from online_learning import online_grads

import rtrl_jax as rj

pytestmark = pytest.mark.x64  # float64 exactness checks

T = 24
INPUT = 3
HIDDEN = 5


def _linen(cell):
    return lambda: rj.from_linen(cell, INPUT)


def _nnx_gru():
    cell = nnx.GRUCell(INPUT, HIDDEN, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    return rj.from_nnx(cell)


CORES = {
    "simple": _linen(nn.SimpleCell(HIDDEN)),
    "gru": _linen(nn.GRUCell(HIDDEN)),
    "lstm": _linen(nn.LSTMCell(HIDDEN)),
    "nnx_gru": _nnx_gru,
}


def _problem(name, seed=0):
    core = CORES[name]()
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    params, _ = core.init(keys[0], jnp.float64)
    # a random, non-zero initial carry makes the test sensitive to how the carry enters.
    carry = jax.tree.map(lambda s: 0.5 * jax.random.normal(keys[1], s.shape, jnp.float64), core.carry_spec)
    xs = jax.random.normal(keys[2], (T, INPUT), jnp.float64)
    weights = jax.random.normal(keys[3], (T, HIDDEN), jnp.float64)
    return core, params, carry, xs, weights


def step_loss(out, w):
    return jnp.sum(jnp.sin(out) * w)


def _online_grads(core, estimator, params, carry, xs, weights):
    """Per-step online gradients of ``step_loss`` (leading axis time)."""
    return online_grads(core, estimator, params, carry, xs, weights, step_loss)


def _bptt_step_grad(core, params, carry, xs, weights, t):
    """``jax.grad`` of the loss of step ``t`` alone through ``lax.scan``."""

    def loss(p):
        _, outs = rj.unroll(core, p, carry, xs[: t + 1])
        return step_loss(outs[t], weights[t])

    return jax.grad(loss)(params)


def relative_error(tree_a, tree_b):
    flat_a = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree_a)])
    flat_b = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree_b)])
    return float(jnp.linalg.norm(flat_a - flat_b) / jnp.linalg.norm(flat_b))


@pytest.mark.parametrize("name", sorted(CORES))
def test_summed_gradient_equals_bptt(name):
    core, params, carry, xs, weights = _problem(name)
    grads = _online_grads(core, rj.rtrl(core), params, carry, xs, weights)
    total = jax.tree.map(lambda g: g.sum(0), grads)

    def summed_loss(p):
        _, outs = rj.unroll(core, p, carry, xs)
        return jnp.sum(jax.vmap(step_loss)(outs, weights))

    reference = jax.grad(summed_loss)(params)
    assert relative_error(total, reference) <= 1e-10


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_per_step_gradient_equals_grad_of_step_loss(name):
    core, params, carry, xs, weights = _problem(name, seed=1)
    grads = _online_grads(core, rj.rtrl(core), params, carry, xs, weights)
    for t in (0, 6, 15, T - 1):
        online = jax.tree.map(lambda g, t=t: g[t], grads)
        assert relative_error(online, _bptt_step_grad(core, params, carry, xs, weights, t)) <= 1e-10


def test_influence_matrix_equals_jacobian_of_unroll():
    core, params, carry, xs, _ = _problem("gru", seed=2)
    estimator = rj.rtrl(core)
    trace = estimator.init(params, carry)
    h = carry
    for x in xs[:6]:
        h, _, trace = estimator.step(trace, params, h, x)
    influence = rj.influence_matrix(estimator, trace, params, h)
    flat_params, unravel = jax.flatten_util.ravel_pytree(params)
    jacobian = jax.jacrev(lambda p: rj.unroll(core, unravel(p), carry, xs[:6])[0])(flat_params)
    np.testing.assert_allclose(influence, jacobian, rtol=1e-12, atol=1e-12)


def test_drop_in_custom_vjp_gives_the_online_gradient():
    core, params, carry, xs, weights = _problem("lstm", seed=3)
    estimator = rj.rtrl(core)
    step = rj.online_step(core, estimator)
    expected = _online_grads(core, estimator, params, carry, xs, weights)

    def loss(p, trace, h, x, w):  # the user's unchanged one-step loss
        h, out, trace = step(p, trace, h, x, None)
        return step_loss(out, w), (trace, h)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    trace, h = estimator.init(params, carry), carry
    for t in range(8):
        (_, (trace, h)), grads = grad_fn(params, trace, h, xs[t], weights[t])
        assert relative_error(grads, jax.tree.map(lambda g, t=t: g[t], expected)) <= 1e-12


def test_vmapped_batch_equals_single_streams():
    core, params, carry, _, _ = _problem("gru", seed=4)
    estimator = rj.rtrl(core)
    batch = 3
    xs = jax.random.normal(jax.random.PRNGKey(9), (batch, 7, INPUT), jnp.float64)
    weights = jax.random.normal(jax.random.PRNGKey(8), (batch, 7, HIDDEN), jnp.float64)
    batched = jax.vmap(lambda x, w: _online_grads(core, estimator, params, carry, x, w))(xs, weights)
    for b in range(batch):
        single = _online_grads(core, estimator, params, carry, xs[b], weights[b])
        assert relative_error(jax.tree.map(lambda g, b=b: g[b], batched), single) <= 1e-12


def test_float32_runs_in_float32():
    core = rj.from_linen(nn.GRUCell(HIDDEN), INPUT)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float32)
    estimator = rj.rtrl(core)
    trace = estimator.init(params, carry)
    h, out, trace = jax.jit(estimator.step)(trace, params, carry, jnp.ones(INPUT, jnp.float32))
    blocks = jax.tree.leaves(trace.influence)
    assert all(b.dtype == jnp.float32 for b in blocks) and out.dtype == jnp.float32
    assert jax.tree.structure(trace.influence) == jax.tree.structure(params)
    assert [b.shape for b in blocks] == [(p.size, core.carry_size) for p in jax.tree.leaves(params)]
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(estimator.grad(trace, params, h)))


def test_jitted_step_does_not_recompile():
    core, params, carry, xs, _ = _problem("gru")
    estimator = rj.rtrl(core)
    traces = []

    def step(trace, params, h, x):
        traces.append(None)  # runs once per trace (compilation), not per call
        return estimator.step(trace, params, h, x)

    step = jax.jit(step)
    trace, h = estimator.init(params, carry), carry
    for x in xs[:3]:
        h, _, trace = step(trace, params, h, x)
    new_params = jax.tree.map(lambda p: p + 1.0, params)
    step(trace, new_params, h, xs[3])
    assert len(traces) == 1


@pytest.mark.parametrize("row_blocks", [2, 3, 1000])
def test_row_blocks_update_in_place_gives_the_same_gradients(row_blocks):
    core, params, carry, xs, weights = _problem("gru")
    whole = _online_grads(core, rj.rtrl(core), params, carry, xs, weights)
    chunked = _online_grads(core, rj.rtrl(core, row_blocks=row_blocks), params, carry, xs, weights)
    assert relative_error(chunked, whole) <= 1e-13


@pytest.mark.parametrize("row_blocks", [0, -1, 1.5, "2"])
def test_row_blocks_must_be_a_positive_integer(row_blocks):
    core, *_ = _problem("simple")
    with pytest.raises(ValueError, match="row_blocks"):
        rj.rtrl(core, row_blocks=row_blocks)
