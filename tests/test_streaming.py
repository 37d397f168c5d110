"""Streaming data: sources drawn chunk by chunk, iterables of chunks, and memory flat in the steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rtrl_jax as rj
from rtrl_jax._src import tasks
from rtrl_jax._src.text import char_task
from rtrl_jax._src.trainer import as_stream, init_train_state, linear_head, train_online


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 20)
    return path


def _tasks(text_path):
    return [tasks.add_task(), tasks.copy_task(length=3), char_task(text_path)]


def test_windows_join_into_one_stream_whatever_the_split(text_path):
    for task in _tasks(text_path):
        source = tasks.task_source(task, jax.random.PRNGKey(1), batch_size=3)
        whole = source.chunk(0, 40)
        parts = [source.chunk(0, 7), source.chunk(7, 20), source.chunk(27, 13)]
        for field, joined in zip(whole, zip(*parts, strict=True), strict=True):
            np.testing.assert_array_equal(field, np.concatenate(joined, axis=1))
        assert whole.inputs.shape == (3, 40, task.input_size)
        assert whole.reset[:, 0].all()


def test_add_window_targets_follow_the_lags():
    window = tasks.add_task(t1=2, t2=3).window(jax.random.PRNGKey(0), 0, 30)
    x = np.asarray(window.inputs[:, 0])
    lag = lambda k: np.concatenate([np.zeros(k), x[:-k]])  # noqa: E731
    np.testing.assert_allclose(window.targets[:, 0], 0.5 + 0.5 * lag(2) - 0.25 * lag(3))


def test_char_window_is_the_sampled_stream(text_path):
    task = char_task(text_path)
    key = jax.random.PRNGKey(3)
    for a, b in zip(task.sample(key, 50), task.window(key, 0, 50), strict=True):
        np.testing.assert_array_equal(a, b)


def _setup(task, hidden=3, batch_size=2, estimator="rtrl"):
    core = rj.from_linen(nn.SimpleCell(hidden), task.input_size)
    est = rj.make_estimator(estimator, core)
    key_core, key_head, key_data, key_state = jax.random.split(jax.random.PRNGKey(0), 4)
    params, _ = core.init(key_core, jnp.float32)
    head_params = linear_head().init(key_head, hidden, task.num_classes)
    optimizer = optax.adam(1e-2)
    state = init_train_state(core, est, optimizer, params, head_params, batch_size=batch_size, key=key_state)
    return core, est, optimizer, state, key_data


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_source_an_iterable_and_the_materialised_stream_train_alike():
    task = tasks.add_task()
    core, est, optimizer, state, key = _setup(task)
    source = tasks.task_source(task, key, batch_size=2, num_steps=60)
    stream = source.chunk(0, 60)
    from_stream, m1 = train_online(core, est, optimizer, stream, state, chunk_size=20)
    from_source, m2 = train_online(core, est, optimizer, source, state, chunk_size=20)
    chunks = ((c.inputs, c.targets, c.reset, c.mask) for c in (source.chunk(s, 20) for s in (0, 20, 40)))
    from_iterable, m3 = train_online(core, est, optimizer, chunks, state)
    _same(from_stream, from_source)
    _same(from_stream, from_iterable)
    np.testing.assert_array_equal(m1.loss, m3.loss)
    # resuming a source part-way continues exactly
    half, _ = train_online(core, est, optimizer, source, state, chunk_size=20, num_steps=40)
    resumed, _ = train_online(core, est, optimizer, source, half, chunk_size=20)
    _same(resumed, from_source)


def test_an_iterable_stops_at_num_steps_and_takes_three_tuples():
    task = tasks.add_task()
    core, est, optimizer, state, key = _setup(task)
    source = tasks.task_source(task, key, batch_size=2)  # unbounded

    def generator():
        start = 0
        while True:  # an endless sensor
            chunk = source.chunk(start, 10)
            yield chunk.inputs, chunk.targets, chunk.reset
            start += 10

    final, metrics = train_online(core, est, optimizer, generator(), state, num_steps=25)
    assert int(final.step) == 25 and metrics.loss.shape == (25,)
    with pytest.raises(ValueError, match="unbounded: give num_steps"):
        train_online(core, est, optimizer, source, state)
    with pytest.raises(ValueError, match=r"\(inputs, targets, reset\[, mask\]\).*got int"):
        train_online(core, est, optimizer, [1], state)
    assert as_stream((jnp.ones((1, 2, 3)), jnp.ones((1, 2, 2)), jnp.zeros((1, 2)))).mask.shape == (1, 2)


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def _flat_memory_run(task, num_steps, chunk_size):
    """Trains ``num_steps`` on a source; the bytes of live JAX arrays after the first and last chunk."""
    core, est, optimizer, state, key = _setup(task, hidden=2, batch_size=1, estimator="snap")
    source = tasks.task_source(task, key, batch_size=1, num_steps=num_steps)
    seen = []
    callback = lambda state, metrics: seen.append(_live_bytes())  # noqa: E731
    final, metrics = train_online(
        core, est, optimizer, source, state, chunk_size=chunk_size, callback=callback, keep_metrics=False
    )
    assert int(final.step) == num_steps and metrics.loss.shape == (0,)
    return seen


def _check_flat(seen, num_steps, chunk_size):
    assert len(seen) == num_steps // chunk_size
    # the same arrays are held after the first chunk and after the last (nothing grows with steps)
    assert max(seen[1:]) <= seen[0], (seen[0], max(seen[1:]))


@pytest.mark.parametrize("which", ["add", "char"])
def test_1e5_steps_hold_flat_memory(which, text_path):
    task = tasks.add_task() if which == "add" else char_task(text_path)
    seen = _flat_memory_run(task, 100_000, 10_000)
    _check_flat(seen, 100_000, 10_000)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["add", "char"])
def test_1e6_steps_hold_flat_memory(which, text_path):
    task = tasks.add_task() if which == "add" else char_task(text_path)
    seen = _flat_memory_run(task, 1_000_000, 20_000)
    _check_flat(seen, 1_000_000, 20_000)
