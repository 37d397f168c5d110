"""Clear errors for inputs that are not what the library functions take."""

import flax.linen as nn
import jax
import pytest
from flax import nnx

import rtrl_jax as rj


@pytest.mark.parametrize("cell", [nn.GRUCell(4), nnx.GRUCell(2, 4, rngs=nnx.Rngs(0))], ids=["linen", "nnx"])
def test_a_flax_cell_is_not_a_core(cell):
    with pytest.raises(TypeError, match=r"got the Flax module GRUCell.*from_linen.*from_nnx"):
        rj.make_estimator("rtrl", cell)


def test_an_estimator_needs_a_callable_core():
    with pytest.raises(TypeError, match="needs a core"):
        rj.make_estimator("snap", 3)


@pytest.mark.parametrize("num_steps, batch_size", [(0, 2), (5, 0), (-1, 1), (2.0, 1)])
def test_sample_batch_needs_positive_sizes(num_steps, batch_size):
    with pytest.raises(ValueError, match="must be a positive integer"):
        rj.sample_batch(rj.add_task(), jax.random.PRNGKey(0), num_steps, batch_size)
