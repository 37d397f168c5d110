"""The online trainer: learning, resets, update schedules, and the tasks it trains on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rtrl_jax as rj
from rtrl_jax._src import tasks
from rtrl_jax._src.trainer import init_train_state, linear_head, make_train_step, train_online


def _setup(task, estimator_name="rtrl", hidden=16, batch=8, steps=3000, lr=3e-3, seed=0, **options):
    core = rj.from_linen(nn.GRUCell(hidden), task.input_size)
    estimator = rj.make_estimator(estimator_name, core, **options)
    key_core, key_head, key_data, key_state = jax.random.split(jax.random.PRNGKey(seed), 4)
    params, _ = core.init(key_core, jnp.float32)
    head_params = linear_head().init(key_head, hidden, task.num_classes)
    optimizer = optax.adam(lr)
    state = init_train_state(core, estimator, optimizer, params, head_params, batch_size=batch, key=key_state)
    stream = tasks.sample_batch(task, key_data, steps, batch)
    return core, estimator, optimizer, state, stream


def _mean_loss(metrics, part):
    return metrics.loss[part].sum() / metrics.weight[part].sum()


# float32 parameters and data; x64 on as when this bound was set (some of the trainer's internal
# arithmetic then runs in float64; with x64 off the run ends at 0.26 and 0.87).
@pytest.mark.x64
@pytest.mark.slow  # 3000 training steps (the default run's learning check: test_rflo.py's add task)
def test_exact_rtrl_learns_the_copy_task():
    task = tasks.copy_task(length=5)
    core, estimator, optimizer, state, stream = _setup(task, steps=3000)
    state, metrics = train_online(core, estimator, optimizer, stream, state, chunk_size=1000)
    final = _mean_loss(metrics, slice(-300, None))
    accuracy = metrics.correct[-300:].sum() / metrics.weight[-300:].sum()
    # chance is log 2 = 0.693 per recall step; a net that copies reaches far below it
    assert final < 0.25 and accuracy > 0.85, (final, accuracy)


def test_resumed_run_equals_uninterrupted_run():
    task = tasks.add_task()
    core, estimator, optimizer, state, stream = _setup(task, hidden=6, batch=2, steps=40)
    full, _ = train_online(core, estimator, optimizer, stream, state, chunk_size=10)
    half_stream = jax.tree.map(lambda a: a[:, :20], stream)
    half, _ = train_online(core, estimator, optimizer, half_stream, state, chunk_size=10)
    resumed, resumed_metrics = train_online(core, estimator, optimizer, stream, half, chunk_size=10)
    assert int(resumed.step) == 40 and resumed_metrics.loss.shape == (20,)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_reset_restores_carry_and_trace():
    task = tasks.copy_task(length=2)
    core, estimator, optimizer, state, stream = _setup(task, hidden=4, batch=2, steps=10)
    step = jax.jit(make_train_step(core, estimator, optimizer))
    first = jax.tree.map(lambda a: a[:, 0], stream)
    state, _ = step(state, first)
    assert sum(float(jnp.abs(b).sum()) for b in jax.tree.leaves(state.trace.influence)) > 0
    # a reset on stream 0 only: stream 0 restarts from zero carry and zero trace
    reset_batch = first._replace(reset=jnp.array([True, False]))
    after, _ = step(state, reset_batch)
    fresh_core = {k: v[0] for k, v in {"c": after.carry}.items()}
    manual = core(state.params["core"], core.initial_carry(jnp.float32), first.inputs[0])[0]
    np.testing.assert_allclose(fresh_core["c"], manual, rtol=1e-6)
    assert not np.allclose(after.carry[1], manual)


def test_update_every_k_steps_with_multisteps():
    task = tasks.add_task()
    core, estimator, _, state, stream = _setup(task, hidden=4, batch=2, steps=6)
    optimizer = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
    state = init_train_state(
        core,
        estimator,
        optimizer,
        state.params["core"],
        state.params["head"],
        batch_size=2,
        key=jax.random.PRNGKey(0),
    )
    step = jax.jit(make_train_step(core, estimator, optimizer))
    params = [state.params]
    for t in range(6):
        state, _ = step(state, jax.tree.map(lambda a, t=t: a[:, t], stream))
        params.append(state.params)

    def changed(a, b):
        return any(
            not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    assert [changed(params[i], params[i + 1]) for i in range(6)] == [False, False, True] * 2


def test_trainer_rejects_bad_streams():
    task = tasks.add_task()
    core, estimator, optimizer, state, stream = _setup(task, hidden=4, batch=2, steps=5)
    with pytest.raises(ValueError, match="axes \\(batch, time, features\\)"):
        train_online(core, estimator, optimizer, jax.tree.map(lambda a: a[0], stream), state)
    with pytest.raises(ValueError, match="empty"):
        train_online(core, estimator, optimizer, jax.tree.map(lambda a: a[:, :0], stream), state)
    with pytest.raises(ValueError, match="3 streams but the state holds 2"):
        other = tasks.sample_batch(task, jax.random.PRNGKey(1), 5, 3)
        train_online(core, estimator, optimizer, other, state)


def test_copy_task_layout():
    stream = tasks.copy_task(length=3, num_symbols=4).sample(jax.random.PRNGKey(0), 16)
    episode = 7
    assert stream.inputs.shape == (16, 5) and stream.targets.shape == (16, 4)
    np.testing.assert_array_equal(stream.reset[: episode + 1], [1, 0, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(stream.mask[:episode], [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(stream.inputs[3], [0, 0, 0, 0, 1])  # delimiter
    np.testing.assert_array_equal(stream.targets[4:7], stream.inputs[0:3, :4])  # recall = pattern


def test_copy_task_with_a_length_range_draws_each_episodes_length_and_recalls_its_pattern():
    task = tasks.copy_task(length=5, num_symbols=3, min_length=2)
    stream = jax.tree.map(np.asarray, task.sample(jax.random.PRNGKey(0), 400))
    assert task.window is None and (task.input_size, task.num_classes) == (4, 3)
    starts = [*np.flatnonzero(stream.reset), 400]
    assert starts[0] == 0
    lengths = []
    for start, end in zip(starts[:-2], starts[1:-1], strict=True):  # the complete episodes
        length = (end - start - 1) // 2
        assert end - start == 2 * length + 1 and 2 <= length <= 5
        shown = stream.inputs[start:end]
        np.testing.assert_array_equal(shown[length], [0, 0, 0, 1])  # the delimiter
        assert not shown[length + 1 :].any()  # blanks while recalling
        np.testing.assert_array_equal(stream.mask[start:end], [0] * (length + 1) + [1] * length)
        np.testing.assert_array_equal(stream.targets[start + length + 1 : end], shown[:length, :3])
        assert not stream.targets[start : start + length + 1].any()
        lengths.append(length)
    assert set(lengths) == {2, 3, 4, 5}  # ~36 episodes: every length drawn
    again = task.sample(jax.random.PRNGKey(0), 400)
    assert all(np.array_equal(a, b) for a, b in zip(stream, again, strict=True))


def test_add_task_targets_follow_the_formula():
    task = tasks.add_task(t1=2, t2=3)
    stream = task.sample(jax.random.PRNGKey(3), 50)
    x = np.asarray(stream.inputs[:, 0])
    for t in range(3, 50):
        assert stream.targets[t, 0] == pytest.approx(0.5 + 0.5 * x[t - 2] - 0.25 * x[t - 3])
    np.testing.assert_allclose(stream.targets.sum(-1), 1.0)


def test_tasks_are_deterministic_given_the_key():
    for task in (tasks.copy_task(), tasks.add_task()):
        a = task.sample(jax.random.PRNGKey(7), 30)
        b = task.sample(jax.random.PRNGKey(7), 30)
        c = task.sample(jax.random.PRNGKey(8), 30)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not np.array_equal(a.inputs, c.inputs)


def test_add_task_baselines_match_the_paper():
    baselines = tasks.add_task_baselines()
    # Marschall et al. 2020: 0.66 (no memory), 0.52 (t1 only), 0.45 (both lags)
    assert baselines["no_memory"] == pytest.approx(0.66, abs=0.005)
    assert baselines["t1_only"] == pytest.approx(0.52, abs=0.005)
    assert baselines["both"] == pytest.approx(0.45, abs=0.005)


@pytest.mark.parametrize(
    "bad",
    [dict(length=0), dict(num_symbols=1), dict(length=2.5), dict(length=3, min_length=4), dict(min_length=0)],
)
def test_copy_task_rejects_bad_options(bad):
    with pytest.raises(ValueError, match="copy"):
        tasks.copy_task(**bad)
