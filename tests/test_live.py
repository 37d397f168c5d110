"""The per-time-step loop: live_step is the jitted train step with the state donated, compiled once
for NumPy and device inputs alike, on a state packed into a few flat buffers (pack_state) or on the
state itself; the loop's result is the scanned trainer's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rtrl_jax as rj


def _mixed_state():
    return {
        "big": jnp.arange(40.0, dtype=jnp.float32).reshape(5, 8),  # 160 bytes: above max_leaf_bytes
        "kernel": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3),
        "bias": jnp.full((3,), -1.5, jnp.float32),
        "step": jnp.array(7, jnp.int32),
        "count": jnp.arange(4, dtype=jnp.int32),
        "done": jnp.array([True, False]),
        "typed_key": jax.random.key(3),
        "raw_key": jax.random.PRNGKey(4),
        "weak": jnp.asarray(2.5),
    }


def test_pack_state_ravels_small_leaves_one_buffer_per_dtype_and_unpacks_them_exactly():
    state = _mixed_state()
    packed = rj.pack_state(state, max_leaf_bytes=64)
    # float32 (kernel, bias), int32 (step, count), bool (done), uint32 (raw_key) raveled;
    # the large leaf, the typed key and the weakly typed scalar alone.
    assert len(packed.buffers) == 4 + 3
    assert sorted(b.size for b in packed.buffers[:4]) == [2, 2, 5, 9]
    back = rj.unpack_state(packed)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for key, leaf in state.items():
        got = back[key]
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, key
        if key == "typed_key":
            got, leaf = jax.random.key_data(got), jax.random.key_data(leaf)
        assert got.weak_type == leaf.weak_type, key
        np.testing.assert_array_equal(got, leaf)
    assert len(rj.pack_state(state).buffers) == 4 + 2  # default max_leaf_bytes: the large leaf packed


def test_live_step_builds_the_step_batch_donates_the_state_and_compiles_once():
    traced = []

    def train_step(state, batch):
        traced.append(1)
        new = dict(
            state, sum=state["sum"] + jnp.sum(batch.inputs * batch.mask[:, None]) + jnp.sum(batch.targets)
        )
        new["count"] = state["count"] + 1
        return new, jnp.sum(batch.reset)

    step = rj.live_step(train_step)
    plain = {"sum": jnp.zeros((3,)), "count": jnp.zeros((), jnp.int32)}
    packed = rj.pack_state(plain)
    x, y = np.ones((2, 3), np.float32), np.full((2,), 2.0, np.float32)
    for inputs in (x, jnp.asarray(x), x):
        old_plain, old_packed = plain, packed
        plain, resets = step(plain, inputs, y)
        packed, packed_resets = step(packed, inputs, y)
        assert old_plain["sum"].is_deleted()
        assert all(buffer.is_deleted() for buffer in old_packed.buffers)
        assert int(resets) == int(packed_resets) == 0
    assert isinstance(packed, rj.PackedState) and len(packed.buffers) == 2
    for state in (plain, rj.unpack_state(packed)):
        np.testing.assert_array_equal(state["sum"], np.full(3, 3 * (6.0 + 4.0)))
        assert int(state["count"]) == 3
    plain, resets = step(plain, x, y, np.zeros(2, np.float32), np.array([True, False]))
    np.testing.assert_array_equal(plain["sum"], np.full(3, 3 * 10.0 + 4.0))
    assert int(resets) == 1
    # once per kind of state, with mask and reset built inside; once more with them given
    assert len(traced) == 3


def test_a_train_step_that_changes_the_packed_layout_is_refused():
    step = rj.live_step(lambda state, batch: ({"w": state["w"].astype(jnp.int32)}, None))
    with pytest.raises(ValueError, match="structure, leaf shapes or dtypes"):
        step(rj.pack_state({"w": jnp.zeros((2,))}), np.ones((1, 2), np.float32), np.ones((1, 2), np.float32))


@pytest.mark.x64
@pytest.mark.parametrize("pack", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_the_live_loop_is_the_scanned_trainer_packed_or_not(pack):
    """Exact RTRL, float64, resets and a mask: the loop's state and metrics are those of
    train_online's scanned chunk (one lax.scan over the same steps)."""
    core = rj.from_linen(nn.SimpleCell(features=3, param_dtype=jnp.float64), 2)
    estimator = rj.make_estimator("rtrl", core)
    optimizer = optax.adam(1e-2)
    params, _ = core.init(jax.random.PRNGKey(0))
    head = rj.linear_head().init(jax.random.PRNGKey(1), 3, 2)
    head = jax.tree.map(lambda a: a.astype(jnp.float64), head)

    def fresh():  # new arrays: a donated plain state takes the parameters' buffers with it
        weights = jax.tree.map(jnp.copy, (params, head))
        return rj.init_train_state(
            core, estimator, optimizer, *weights, batch_size=2, key=jax.random.PRNGKey(2)
        )

    steps = 5
    rng = np.random.default_rng(0)
    stream = rj.Stream(
        inputs=rng.standard_normal((2, steps, 2)),
        targets=np.eye(2)[rng.integers(0, 2, (2, steps))],
        mask=rng.integers(0, 2, (2, steps)).astype(np.float64),
        reset=np.zeros((2, steps), bool).copy(),
    )
    stream.reset[1, 3] = True
    want, want_metrics = rj.train_online(core, estimator, optimizer, stream, fresh())

    step = rj.live_step(rj.make_train_step(core, estimator, optimizer))
    state = rj.pack_state(fresh()) if pack else fresh()
    metrics = []
    for t in range(steps):
        state, m = step(state, *(np.asarray(a[:, t]) for a in stream))
        metrics.append(m)
    got = rj.unpack_state(state) if pack else state
    got_metrics = jax.tree.map(lambda *a: np.stack(a), *metrics)
    assert jax.tree.leaves(got)[1].dtype == jnp.float64
    for g, w in zip(jax.tree.leaves((got, got_metrics)), jax.tree.leaves((want, want_metrics)), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
