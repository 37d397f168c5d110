"""Online learning tasks as streams: every step has an input, a target distribution and a loss weight.

A :class:`Stream` holds one stream (leading axis time) or a batch of independent streams (leading
axes batch, time). Targets are probability vectors over ``num_classes`` (one-hot for hard targets)
and the step loss is the cross-entropy of the readout's softmax against them, weighted by ``mask``.
``reset`` marks the first step of an episode: the trainer resets the carry and the trace before it.
Streams are deterministic given the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Stream(NamedTuple):
    """A stream of steps (leading axis time, or batch then time).

    Attributes:
      inputs: ``(..., T, input_size)`` floats.
      targets: ``(..., T, num_classes)`` target probabilities.
      mask: ``(..., T)`` weight of each step's loss (0 where the step has no target).
      reset: ``(..., T)`` bool, True at the first step of an episode.
    """

    inputs: jax.Array
    targets: jax.Array
    mask: jax.Array
    reset: jax.Array


class Task(NamedTuple):
    """A task that samples streams.

    Attributes:
      name: the task's name.
      input_size: features of one input.
      num_classes: size of the target distribution.
      sample: ``(key, num_steps) -> Stream`` for one stream.
      hard_targets: whether targets are one-hot (so accuracy is meaningful).
    """

    name: str
    input_size: int
    num_classes: int
    sample: Callable[[jax.Array, int], Stream]
    hard_targets: bool


def sample_batch(task: Task, key: jax.Array, num_steps: int, batch_size: int) -> Stream:
    """``batch_size`` independent streams of ``task``: a :class:`Stream` with leading axes (B, T).

    Raises:
      ValueError: ``num_steps`` or ``batch_size`` is not a positive integer.
    """
    _check_positive("num_steps", num_steps)
    _check_positive("batch_size", batch_size)
    return jax.vmap(lambda k: task.sample(k, num_steps))(jax.random.split(key, batch_size))


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def copy_task(length: int = 5, num_symbols: int = 2) -> Task:
    """The copy task: see a pattern, then reproduce it after a delimiter.

    An episode has ``2 * length + 1`` steps: ``length`` random symbols (one-hot over
    ``num_symbols`` input channels), one delimiter step (the last input channel), then ``length``
    blank steps in which the targets are the pattern's symbols in order. Only the recall steps carry
    a loss. Episodes follow each other in the stream, each starting with a reset. Chance level is a
    cross-entropy of ``log(num_symbols)`` per recall step.

    Args:
      length: symbols per pattern.
      num_symbols: alphabet size (2 for bits).
    """
    _check_positive("copy length", length)
    _check_positive("copy num_symbols", num_symbols)
    if num_symbols < 2:
        raise ValueError(f"copy num_symbols must be >= 2, got {num_symbols}.")
    episode = 2 * length + 1

    def sample(key, num_steps):
        num_episodes = -(-num_steps // episode)
        symbols = jax.random.randint(key, (num_episodes, length), 0, num_symbols)
        pattern = jax.nn.one_hot(symbols, num_symbols + 1, dtype=jnp.float32)
        delimiter = jnp.broadcast_to(
            jax.nn.one_hot(num_symbols, num_symbols + 1, dtype=jnp.float32),
            (num_episodes, 1, num_symbols + 1),
        )
        blank = jnp.zeros((num_episodes, length, num_symbols + 1), jnp.float32)
        inputs = jnp.concatenate([pattern, delimiter, blank], axis=1)
        recall = jax.nn.one_hot(symbols, num_symbols, dtype=jnp.float32)
        targets = jnp.concatenate(
            [jnp.zeros((num_episodes, length + 1, num_symbols), jnp.float32), recall], 1
        )
        mask = jnp.concatenate(
            [
                jnp.zeros((num_episodes, length + 1), jnp.float32),
                jnp.ones((num_episodes, length), jnp.float32),
            ],
            1,
        )
        reset = jnp.zeros((num_episodes, episode), bool).at[:, 0].set(True)
        flat = Stream(inputs, targets, mask, reset)
        return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:num_steps], flat)

    return Task(f"copy(length={length})", num_symbols + 1, num_symbols, sample, True)


def add_task(t1: int = 5, t2: int = 9) -> Task:
    """The "add" (coin) task of Marschall, Cho & Savin 2020.

    ``x_t ~ Bernoulli(0.5)``, input one-hot ``[x_t, 1 - x_t]``; the target distribution over two
    classes is ``[y_t, 1 - y_t]`` with ``y_t = 0.5 + 0.5 x_{t-t1} - 0.25 x_{t-t2}`` (``x = 0`` before
    the stream starts). One continuous stream, every step has a loss. Cross-entropy baselines from
    the paper: 0.666 without memory, 0.52 with the ``t1`` dependency, 0.45 with both.

    Args:
      t1: the first lag.
      t2: the second lag.
    """
    _check_positive("add t1", t1)
    _check_positive("add t2", t2)

    def lagged(x, lag):
        return jnp.concatenate([jnp.zeros((lag,), x.dtype), x[:-lag]])[: x.shape[0]]

    def sample(key, num_steps):
        x = jax.random.bernoulli(key, 0.5, (num_steps,)).astype(jnp.float32)
        y = 0.5 + 0.5 * lagged(x, t1) - 0.25 * lagged(x, t2)
        return Stream(
            inputs=jnp.stack([x, 1.0 - x], axis=-1),
            targets=jnp.stack([y, 1.0 - y], axis=-1),
            mask=jnp.ones((num_steps,), jnp.float32),
            reset=jnp.zeros((num_steps,), bool).at[0].set(True),
        )

    return Task(f"add(t1={t1},t2={t2})", 2, 2, sample, False)


def add_task_baselines(t1: int = 5, t2: int = 9) -> dict[str, float]:
    """Expected cross-entropy of the add task for predictors that know no lag, lag ``t1``, or both.

    Computed exactly by enumerating ``(x_{t-t1}, x_{t-t2})``; does not depend on ``t1, t2``.
    """
    del t1, t2

    def xent(p, q):
        def plogq(a, b):
            return 0.0 if a == 0 else a * np.log(b)

        return -(plogq(p, q) + plogq(1 - p, 1 - q))

    ys = {(a, b): 0.5 + 0.5 * a - 0.25 * b for a in (0, 1) for b in (0, 1)}
    mean_y = np.mean(list(ys.values()))
    no_memory = np.mean([xent(y, mean_y) for y in ys.values()])
    first = np.mean([xent(y, np.mean([ys[(a, c)] for c in (0, 1)])) for (a, _), y in ys.items()])
    both = np.mean([xent(y, y) for y in ys.values()])
    return {"no_memory": float(no_memory), "t1_only": float(first), "both": float(both)}
