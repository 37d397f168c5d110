"""The online trainer on whole Flax models: the core+head trainer reproduced, stacks that learn, any
per-step loss, the non-finite guard, one compilation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from online_learning import jit

import rtrl_jax as rj
from rtrl_jax._src import tasks
from rtrl_jax._src.trainer import (
    NonFiniteError,
    make_model_train_chunk,
    make_model_train_step,
    nonfinite_names,
)


class OneLayer(nn.Module):
    """One online layer (GRU unless told) and a linear head: the model the core+head trainer trains."""

    hidden: int
    outputs: int
    estimator: str = "rtrl"
    cell_type: type = nn.GRUCell

    @nn.compact
    def __call__(self, x, reset):
        h = rj.OnlineRNN(self.cell_type(self.hidden), self.estimator, name="rnn")(x, reset)
        return nn.Dense(self.outputs, name="head")(h)


class TwoLayers(nn.Module):
    """Dense encoder -> two online GRU layers (SnAp-1 below, exact RTRL above) -> MLP head."""

    hidden: int
    outputs: int

    @nn.compact
    def __call__(self, x, reset):
        h = nn.Dense(self.hidden, name="encoder")(x)
        h = rj.OnlineRNN(nn.GRUCell(self.hidden), "snap", name="rnn0")(h, reset)
        h = rj.OnlineRNN(nn.GRUCell(self.hidden), "rtrl", name="rnn1")(h, reset)
        return nn.Dense(self.outputs, name="head")(nn.relu(nn.Dense(self.hidden, name="mlp")(h)))


def _model_state(model, optimizer, stream, key, dtype=jnp.float32):
    x0 = stream.inputs[:, 0]
    x0 = x0.astype(jnp.float32) if jnp.issubdtype(x0.dtype, jnp.inexact) else x0
    variables = rj.cast_floating(model.init(key, x0, stream.reset[:, 0]), dtype)
    batch = stream.reset.shape[0]
    return rj.init_model_train_state(optimizer, variables, batch_size=batch, key=jax.random.PRNGKey(9))


def _mean_loss(metrics, part):
    return float(metrics.loss[part].sum() / metrics.weight[part].sum())


@pytest.mark.x64
def test_one_layer_and_linear_head_reproduce_the_core_and_head_trainer():
    # the copy task: episodes (resets) and a loss mask; MultiSteps(Adam) updates every 2 steps
    task, hidden, batch, steps = tasks.copy_task(length=1), 3, 2, 12
    optimizer = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    core = rj.from_linen(nn.GRUCell(hidden), task.input_size)
    estimator = rj.rtrl(core)
    key_core, key_head, key_data, key_state = jax.random.split(jax.random.PRNGKey(0), 4)
    core_params, _ = core.init(key_core, jnp.float64)
    head_params = rj.linear_head().init(key_head, hidden, task.num_classes, jnp.float64)
    stream = tasks.sample_batch(task, key_data, steps, batch)
    state = rj.init_train_state(
        core, estimator, optimizer, core_params, head_params, batch_size=batch, key=key_state
    )
    final, metrics = rj.train_online(core, estimator, optimizer, stream, state, chunk_size=steps)

    model = OneLayer(hidden, task.num_classes)
    model_state = _model_state(model, optimizer, stream, key_state, jnp.float64)
    params = {"rnn": {"core": core_params}, "head": head_params}
    model_state = model_state._replace(params=params, opt_state=optimizer.init(params))
    model_final, model_metrics = rj.train_model_online(
        model, optimizer, stream, model_state, chunk_size=steps
    )

    for name in ("loss", "weight", "correct", "grad_norm"):
        np.testing.assert_allclose(getattr(model_metrics, name), getattr(metrics, name), rtol=1e-12, atol=0)
    expected = {"rnn": {"core": final.params["core"]}, "head": final.params["head"]}
    for a, b in zip(jax.tree.leaves(model_final.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model_final.online["online"]["rnn"]["carry"], final.carry, rtol=1e-12)


class NNXOneLayer(nnx.Module):
    """The nnx counterpart of ``OneLayer(cell_type=nn.SimpleCell)`` (float64)."""

    def __init__(self, inputs, hidden, outputs, batch_size):
        kw = {"dtype": jnp.float64, "param_dtype": jnp.float64, "rngs": nnx.Rngs(0)}
        cell = nnx.SimpleCell(inputs, hidden, **kw)
        self.rnn = rj.NNXOnlineRNN(cell, "rtrl", batch_size=batch_size, rngs=nnx.Rngs(1))
        self.head = nnx.Linear(hidden, outputs, **kw)

    def __call__(self, x, reset):
        return self.head(self.rnn(x, reset))


def _as_linen(params):
    """An ``NNXOneLayer``'s parameters in the layout of ``OneLayer(cell_type=nn.SimpleCell)``."""
    params = nnx.to_pure_dict(params)
    cell = params["rnn"]["cell"]
    return {"rnn": {"core": {"i": cell["dense_i"], "h": cell["dense_h"]}}, "head": params["head"]}


@pytest.mark.x64
def test_nnx_model_follows_the_linen_model_through_the_same_trainer():
    # the copy task: per-stream episodes (resets) and a loss mask; MultiSteps(Adam) every 2 steps
    task, hidden, batch, steps = tasks.copy_task(length=1), 3, 2, 9
    optimizer = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    stream = tasks.sample_batch(task, jax.random.PRNGKey(10), steps, batch)
    net = NNXOneLayer(task.input_size, hidden, task.num_classes, batch)
    nnx_state = rj.init_model_train_state(optimizer, net, batch_size=batch, key=jax.random.PRNGKey(11))
    nnx_final, nnx_metrics = rj.train_model_online(net, optimizer, stream, nnx_state, chunk_size=steps)

    # the linen model through the same step, one jitted step at a time (XLA optimisation off)
    model = OneLayer(hidden, task.num_classes, cell_type=nn.SimpleCell)
    final = _model_state(model, optimizer, stream, jax.random.PRNGKey(11), jnp.float64)
    params = _as_linen(nnx_state.params)
    final = final._replace(params=params, opt_state=optimizer.init(params))
    train_step = jit(make_model_train_step(model, optimizer))
    per_step = []
    for t in range(steps):
        batch = jax.tree.map(lambda a, t=t: a[:, t], stream)
        final, step_metrics = train_step(final, batch._replace(inputs=batch.inputs.astype(jnp.float64)))
        per_step.append(step_metrics)
    metrics = jax.tree.map(lambda *m: np.stack(m), *per_step)

    assert metrics.weight.sum() > 0 and np.all(metrics.grad_norm[metrics.weight > 0] > 0)
    for name in ("loss", "weight", "correct", "grad_norm"):
        np.testing.assert_allclose(getattr(nnx_metrics, name), getattr(metrics, name), rtol=1e-12, atol=0)
    for a, b in zip(jax.tree.leaves(_as_linen(nnx_final.params)), jax.tree.leaves(final.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    carry = nnx_final.online["rnn"]["carry"].get_value()
    np.testing.assert_allclose(carry, final.online["online"]["rnn"]["carry"], rtol=1e-12)
    nnx.update(net, nnx_final.params, nnx_final.online)  # the trained state back into the module
    np.testing.assert_array_equal(net.head.bias.get_value(), nnx_final.params["head"]["bias"].get_value())


@pytest.mark.slow  # 1500 steps of a 2-layer GRU model: about a minute on 2 CPU cores
def test_two_layer_model_learns_the_add_task():
    task, batch, steps = tasks.add_task(), 8, 1500
    stream = tasks.sample_batch(task, jax.random.PRNGKey(1), steps, batch)
    model, optimizer = TwoLayers(16, task.num_classes), optax.adam(3e-3)
    state = _model_state(model, optimizer, stream, jax.random.PRNGKey(2))
    state, metrics = rj.train_model_online(model, optimizer, stream, state, chunk_size=500)
    # 0.666 without memory (Marschall et al. 2020); the t1 dependency alone gives 0.52
    assert _mean_loss(metrics, slice(-300, None)) < 0.6, _mean_loss(metrics, slice(-300, None))
    assert int(state.step) == steps and not metrics.nonfinite.any()


def _delayed_stream(key, batch, steps):
    """Regression: the target is the input one step back (a float per step, no mask)."""
    x = jax.random.normal(key, (batch, steps, 1))
    y = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    reset = jnp.zeros((batch, steps), bool).at[:, 0].set(True)
    return rj.Stream(x, y, jnp.ones((batch, steps)), reset)


def test_regression_loss_learns_to_recall_the_last_input():
    stream = _delayed_stream(jax.random.PRNGKey(3), 4, 400)
    model, optimizer = OneLayer(8, 1, "snap"), optax.adam(2e-2)
    state = _model_state(model, optimizer, stream, jax.random.PRNGKey(4))

    def squared_error(out, target):
        return 0.5 * jnp.sum((out - target) ** 2)

    state, metrics = rj.train_model_online(
        model, optimizer, stream, state, loss_fn=squared_error, chunk_size=200
    )
    first, last = _mean_loss(metrics, slice(0, 50)), _mean_loss(metrics, slice(-50, None))
    assert last < 0.5 * first, (first, last)


class Tokens(nn.Module):
    """nn.Embed -> an online layer -> logits over the vocabulary."""

    vocab: int

    @nn.compact
    def __call__(self, tokens, reset):
        h = nn.Embed(self.vocab, 4)(tokens)
        return nn.Dense(self.vocab)(rj.OnlineRNN(nn.SimpleCell(6), "uoro")(h, reset))


def test_masked_loss_on_integer_tokens_and_labels():
    batch, steps, vocab = 3, 30, 5
    k_tokens, k_mask, k_init = jax.random.split(jax.random.PRNGKey(5), 3)
    tokens = jax.random.randint(k_tokens, (batch, steps + 1), 0, vocab)
    mask = (jax.random.uniform(k_mask, (batch, steps)) < 0.5).astype(jnp.float32)
    reset = jnp.zeros((batch, steps), bool).at[:, 0].set(True).at[1, 12].set(True)
    stream = rj.Stream(tokens[:, :-1], tokens[:, 1:], mask, reset)
    model, optimizer = Tokens(vocab), optax.sgd(0.1)
    state = _model_state(model, optimizer, stream, k_init)
    state, metrics = rj.train_model_online(
        model, optimizer, stream, state, loss_fn=optax.softmax_cross_entropy_with_integer_labels
    )
    np.testing.assert_array_equal(metrics.weight, mask.sum(0))
    assert np.all(metrics.loss[metrics.weight == 0] == 0) and np.all(metrics.loss[metrics.weight > 0] > 0)
    assert np.all(metrics.correct <= metrics.weight) and np.isfinite(metrics.grad_norm).all()


def test_nonfinite_step_is_skipped_and_every_stream_restarts_at_the_next():
    task = tasks.add_task()
    stream = tasks.sample_batch(task, jax.random.PRNGKey(6), 20, 2)
    poisoned = stream._replace(inputs=stream.inputs.at[1, 7, 0].set(jnp.nan))
    model, optimizer = OneLayer(4, task.num_classes), optax.sgd(0.1)
    state = _model_state(model, optimizer, stream, jax.random.PRNGKey(7))
    final, metrics = rj.train_model_online(model, optimizer, poisoned, state, chunk_size=10)
    assert np.flatnonzero(metrics.nonfinite).tolist() == [7]
    assert {"loss", "carry", "trace"} <= set(nonfinite_names(metrics.nonfinite[7]))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves((final.params, final.online)))
    assert np.isfinite(metrics.loss[8:]).all() and not final.restart.any()
    with pytest.raises(NonFiniteError, match="at step 8") as info:
        rj.train_model_online(model, optimizer, poisoned, state, chunk_size=10, nonfinite="stop")
    assert int(info.value.state.step) == 8 and info.value.state.restart.all()


def test_a_resumed_run_equals_the_uninterrupted_run_and_compiles_once():
    task = tasks.add_task()
    stream = tasks.sample_batch(task, jax.random.PRNGKey(8), 30, 2)
    model, optimizer = TwoLayers(4, task.num_classes), optax.adam(1e-2)
    state = _model_state(model, optimizer, stream, jax.random.PRNGKey(9))
    full, _ = rj.train_model_online(model, optimizer, stream, state, chunk_size=10)
    half, _ = rj.train_model_online(
        model, optimizer, jax.tree.map(lambda a: a[:, :20], stream), state, chunk_size=10
    )
    resumed, metrics = rj.train_model_online(model, optimizer, stream, half, chunk_size=10)
    assert int(resumed.step) == 30 and metrics.loss.shape == (10,)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    chunk = make_model_train_chunk(model, optimizer)
    assert chunk is make_model_train_chunk(TwoLayers(4, task.num_classes), optimizer)
    assert chunk._cache_size() == 1
