"""The per-time-step loop: live_step is the jitted train step with the state donated, compiled once
for NumPy and device inputs alike."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rtrl_jax as rj


def test_live_step_builds_the_step_batch_donates_the_state_and_compiles_once():
    traced = []

    def train_step(state, batch):
        traced.append(1)
        new = {"sum": state["sum"] + jnp.sum(batch.inputs * batch.mask[:, None]) + jnp.sum(batch.targets)}
        return new, jnp.sum(batch.reset)

    step = rj.live_step(train_step)
    state = {"sum": jnp.zeros((3,))}
    x, y = np.ones((2, 3), np.float32), np.full((2,), 2.0, np.float32)
    for inputs in (x, jnp.asarray(x), x):
        old = state
        state, resets = step(state, inputs, y)
        assert old["sum"].is_deleted()
        assert int(resets) == 0
    np.testing.assert_array_equal(state["sum"], np.full(3, 3 * (6.0 + 4.0)))
    state, resets = step(state, x, y, np.zeros(2, np.float32), np.array([True, False]))
    np.testing.assert_array_equal(state["sum"], np.full(3, 3 * 10.0 + 4.0))
    assert int(resets) == 1
    assert len(traced) == 2  # once with mask and reset built inside, once with them given


@pytest.mark.slow  # compiles the train step twice
def test_live_step_is_the_train_step_donated_and_compiled_once():
    core = rj.from_linen(nn.SimpleCell(features=4), 2)
    estimator = rj.make_estimator("rtrl", core)
    optimizer = optax.sgd(1e-2)
    params, _ = core.init(jax.random.PRNGKey(0))
    head = rj.linear_head().init(jax.random.PRNGKey(1), 4, 3)

    def fresh():
        return rj.init_train_state(
            core, estimator, optimizer, params, head, batch_size=2, key=jax.random.PRNGKey(2)
        )

    traced = []
    train_step = rj.make_train_step(core, estimator, optimizer)

    def counted(state, batch):
        traced.append(1)
        return train_step(state, batch)

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((4, 2, 2), dtype=np.float32)
    ys = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (4, 2))]
    reference = jax.jit(train_step)
    want = fresh()
    for x, y in zip(xs, ys, strict=True):
        want, want_metrics = reference(want, rj.Stream(x, y, np.ones(2, np.float32), np.zeros(2, bool)))

    step = rj.live_step(counted)
    state = fresh()
    for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
        old = state
        state, metrics = step(state, x if t % 2 else jnp.asarray(x), y if t % 2 else jnp.asarray(y))
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.trace))  # donated
    assert len(traced) == 1
    for got, expected in zip(
        jax.tree.leaves((state, metrics)), jax.tree.leaves((want, want_metrics)), strict=True
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
