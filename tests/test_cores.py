"""Core adapters and the errors users get for bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import rtrl_jax as rj


@pytest.mark.parametrize(
    "cell, carry_leaves",
    [
        (nn.SimpleCell(4), 1),
        (nn.GRUCell(4), 1),
        (nn.MGUCell(4), 1),
        (nn.LSTMCell(4), 2),
        (nn.OptimizedLSTMCell(4), 2),
    ],
)
def test_linen_cells_become_cores(cell, carry_leaves):
    core = rj.from_linen(cell, 3)
    params, carry = core.init(jax.random.PRNGKey(0))
    assert len(jax.tree.leaves(carry)) == carry_leaves
    new_carry, out = core(params, carry, jnp.ones(3, jnp.float32))
    assert out.shape == (4,)
    # the output is read off the new carry (for LSTM: h of (c, h))
    assert jnp.array_equal(core.output(new_carry), out)


def test_user_linen_cell_with_pytree_carry():
    class TwoTimescales(nn.RNNCellBase):
        features: int

        @nn.compact
        def __call__(self, carry, x):
            fast, slow = carry
            fast = jnp.tanh(nn.Dense(self.features)(x) + nn.Dense(self.features, use_bias=False)(fast))
            slow = 0.9 * slow + 0.1 * fast
            return (fast, slow), slow

        def initialize_carry(self, rng, input_shape):
            zeros = jnp.zeros((self.features,))
            return zeros, zeros

        @property
        def num_feature_axes(self):
            return 1

    core = rj.from_linen(TwoTimescales(3), 2)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float32)
    new_carry, out = core(params, carry, jnp.ones(2, jnp.float32))
    assert jnp.array_equal(out, new_carry[1]) and jnp.array_equal(core.output(new_carry), out)


def test_nnx_lstm_core():
    core = rj.from_nnx(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)))
    params, carry = core.init(jax.random.PRNGKey(0))
    new_carry, out = core(params, carry, jnp.ones(3, jnp.float32))
    assert jnp.array_equal(core.output(new_carry), out)


def test_from_function_core():
    def apply(params, h, x):
        h = jnp.tanh(params["w"] @ h + params["u"] @ x)
        return h, h

    params = {"w": jnp.eye(3), "u": jnp.ones((3, 2))}
    core = rj.from_function(apply, params=params, carry=jnp.zeros(3), input_shape=(2,))
    h, out = core(params, jnp.zeros(3), jnp.ones(2))
    assert jnp.array_equal(h, out)


@pytest.fixture(scope="module")
def gru():
    core = rj.from_linen(nn.GRUCell(4), 3)
    return core, *core.init(jax.random.PRNGKey(0))


def test_input_size_mismatch_is_named(gru):
    core, params, carry = gru
    with pytest.raises(ValueError, match="input size mismatch: the core takes 3 features, got 5"):
        core(params, carry, jnp.ones(5, jnp.float32))


def test_batched_input_points_to_vmap(gru):
    core, params, carry = gru
    with pytest.raises(ValueError, match="jax.vmap"):
        core(params, carry, jnp.ones((2, 3), jnp.float32))


def test_carry_shape_mismatch_is_named(gru):
    core, params, carry = gru
    with pytest.raises(ValueError, match=r"carry does not match the cell: expected \(4,\), got \(5,\)"):
        core(params, jnp.zeros(5), jnp.ones(3, jnp.float32))
    with pytest.raises(ValueError, match="carry does not match"):
        rj.rtrl(core).step(
            rj.rtrl(core).init(params, carry), params, (carry, carry), jnp.ones(3, jnp.float32)
        )


@pytest.mark.x64  # float64 parameters to mix with float32 ones
def test_dtype_mix_is_rejected(gru):
    core, params, carry = gru
    with pytest.raises(ValueError, match="mix floating dtypes"):
        core(rj.cast_floating(params, jnp.float64), carry, jnp.ones(3, jnp.float32))


def test_params_mismatch_is_named(gru):
    core, params, carry = gru
    with pytest.raises(ValueError, match="params do not match"):
        core({"other": params}, carry, jnp.ones(3, jnp.float32))


def test_unknown_estimator_lists_the_known_ones(gru):
    with pytest.raises(ValueError, match=r"unknown estimator 'rtlr'; known estimators: ") as error:
        rj.make_estimator("rtlr", gru[0])
    known = str(error.value).split("known estimators: ")[1].rstrip(".").split(", ")
    assert known == [info.name for info in rj.registered()]


def test_unknown_estimator_option_is_named(gru):
    with pytest.raises(ValueError, match=r"no option\(s\) \['rank'\]"):
        rj.make_estimator("rtrl", gru[0], rank=2)


def test_linen_adapter_rejects_non_cells():
    with pytest.raises(TypeError, match="flax.linen recurrent cell"):
        rj.from_linen(lambda c, x: (c, x), 3)
    with pytest.raises(ValueError, match="input_size must be a positive integer"):
        rj.from_linen(nn.GRUCell(4), 0)
