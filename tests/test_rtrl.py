"""Exact RTRL against BPTT (``jax.grad`` through ``lax.scan``), float64."""

import functools

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


def relative_error(tree_a, tree_b):
    flat_a = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree_a)])
    flat_b = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree_b)])
    return float(jnp.linalg.norm(flat_a - flat_b) / jnp.linalg.norm(flat_b))


# The linen cores are held per step (stricter) to BPTT in float64 by tests/test_conformance.py under
# -m slow (its default run: the element-wise ELSTM; the GRU's trace is checked against the Jacobian
# of the unroll below). The nnx core here.
@pytest.mark.parametrize("name", ["nnx_gru"])
def test_summed_gradient_equals_bptt(name):
    core, params, carry, xs, weights = _problem(name)
    grads = _online_grads(core, rj.rtrl(core), params, carry, xs, weights)
    total = jax.tree.map(lambda g: g.sum(0), grads)

    def summed_loss(p):
        _, outs = rj.unroll(core, p, carry, xs)
        return jnp.sum(jax.vmap(step_loss)(outs, weights))

    reference = jax.grad(summed_loss)(params)
    assert relative_error(total, reference) <= 1e-10


def test_influence_matrix_equals_jacobian_of_unroll():
    core, params, carry, xs, _ = _problem("gru", seed=2)
    estimator = rj.rtrl(core)

    @jax.jit
    def influence_and_jacobian(params, carry, xs):
        h, trace, _ = rj.rollout(estimator, params, carry, xs)
        influence = rj.influence_matrix(estimator, trace, params, h)
        flat_params, unravel = jax.flatten_util.ravel_pytree(params)
        jacobian = jax.jacrev(lambda p: rj.unroll(core, unravel(p), carry, xs)[0])(flat_params)
        return influence, jacobian

    influence, jacobian = influence_and_jacobian(params, carry, xs[:6])
    np.testing.assert_allclose(influence, jacobian, rtol=1e-12, atol=1e-12)


@functools.cache
def _whole_gru_grads():
    core, params, carry, xs, weights = _problem("gru")
    return _online_grads(core, rj.rtrl(core), params, carry, xs, weights)


@pytest.mark.parametrize("row_blocks", [2, 3, 1000])
def test_row_blocks_update_in_place_gives_the_same_gradients(row_blocks):
    core, params, carry, xs, weights = _problem("gru")
    whole = _whole_gru_grads()
    chunked = _online_grads(core, rj.rtrl(core, row_blocks=row_blocks), params, carry, xs, weights)
    assert relative_error(chunked, whole) <= 1e-13


@pytest.mark.parametrize("row_blocks", [0, -1, 1.5, "2"])
def test_row_blocks_must_be_a_positive_integer(row_blocks):
    core, *_ = _problem("simple")
    with pytest.raises(ValueError, match="row_blocks"):
        rj.rtrl(core, row_blocks=row_blocks)


def test_trace_holds_one_block_per_parameter():
    core = rj.from_linen(nn.GRUCell(HIDDEN), INPUT)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float32)
    trace = jax.eval_shape(rj.rtrl(core).init, params, carry)
    assert jax.tree.structure(trace.influence) == jax.tree.structure(params)
    blocks = jax.tree.leaves(trace.influence)
    assert [b.shape for b in blocks] == [(p.size, core.carry_size) for p in jax.tree.leaves(params)]
