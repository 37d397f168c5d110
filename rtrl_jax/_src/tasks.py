"""Online learning tasks as streams: every step has an input, a target distribution and a loss weight.

A :class:`Stream` holds one stream (leading axis time) or a batch of independent streams (leading
axes batch, time). Targets are probability vectors over ``num_classes`` (one-hot for hard targets)
and the step loss is the cross-entropy of the readout's softmax against them, weighted by ``mask``.
``reset`` marks the first step of an episode: the trainer resets the carry and restarts the trace
(:func:`~rtrl_jax.restart_trace`) before it.
Streams are deterministic given the key.

A :class:`Source` produces a batch of streams chunk by chunk, so a run's memory does not grow with
its number of steps: :func:`task_source` draws any window of a task's streams on its own
(:attr:`Task.window`), and the trainer also takes a plain Python iterable of chunks (data from a
simulator, a sensor, an environment).
"""

from __future__ import annotations

import functools
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
      window: ``(key, start, num_steps) -> Stream``, steps ``start .. start + num_steps - 1`` of
        one stream of the key, drawn on their own (``start`` may be traced, ``num_steps`` is
        static), or ``None``. Every step's randomness comes from the key folded with the step (or
        episode) index, so consecutive windows join into one stream whatever their lengths. The
        shipped tasks draw ``window`` and ``sample`` from the key in different ways (same
        distribution, other samples), except the char task, whose two agree.
    """

    name: str
    input_size: int
    num_classes: int
    sample: Callable[[jax.Array, int], Stream]
    hard_targets: bool
    window: Callable[[jax.Array, jax.Array, int], Stream] | None = None


def sample_batch(task: Task, key: jax.Array, num_steps: int, batch_size: int) -> Stream:
    """``batch_size`` independent streams of ``task``: a :class:`Stream` with leading axes (B, T).

    Raises:
      ValueError: ``num_steps`` or ``batch_size`` is not a positive integer.
    """
    _check_positive("num_steps", num_steps)
    _check_positive("batch_size", batch_size)
    return jax.vmap(lambda k: task.sample(k, num_steps))(jax.random.split(key, batch_size))


class Source(NamedTuple):
    """A batch of streams produced chunk by chunk (memory independent of the number of steps).

    Attributes:
      chunk: ``(start, num_steps) -> Stream``, steps ``start .. start + num_steps - 1`` of every
        stream (leading axes batch, time). Random access: the same window always gives the same
        chunk, so a resumed run continues exactly.
      batch_size: the number of streams.
      num_steps: the length of the streams, or ``None`` for unbounded ones.
    """

    chunk: Callable[[int, int], Stream]
    batch_size: int
    num_steps: int | None = None


def task_source(task: Task, key: jax.Array, batch_size: int, num_steps: int | None = None) -> Source:
    """``batch_size`` independent streams of ``task``, drawn chunk by chunk from ``task.window``.

    Args:
      task: a task with a ``window`` (the shipped tasks have one).
      key: the random key; stream ``b`` is the stream of ``jax.random.split(key, batch_size)[b]``.
      batch_size: the number of streams.
      num_steps: the length of the streams, or ``None`` for unbounded streams.

    Returns:
      A :class:`Source`; each chunk is one jitted call (one compilation per chunk length).

    Raises:
      ValueError: the task has no ``window``, or a count is not a positive integer.

    Example::

        source = task_source(add_task(), jax.random.PRNGKey(0), batch_size=8)
        first = source.chunk(0, 500)  # steps 0..499 of 8 streams
    """
    if task.window is None:
        raise ValueError(
            f"task {task.name!r} has no window (key, start, num_steps) -> Stream to draw chunks from;"
            " give Task(..., window=...) or pass the trainer an iterable of chunks."
        )
    _check_positive("batch_size", batch_size)
    if num_steps is not None:
        _check_positive("num_steps", num_steps)
    keys = jax.random.split(key, batch_size)

    @functools.partial(jax.jit, static_argnums=1)
    def draw(start, length):
        return jax.vmap(lambda k: task.window(k, start, length))(keys)

    def chunk(start: int, length: int) -> Stream:
        _check_positive("chunk length", length)
        if isinstance(start, bool) or not isinstance(start, int | np.integer) or start < 0:
            raise ValueError(f"chunk start must be a non-negative integer, got {start!r}.")
        return draw(jnp.asarray(start, jnp.int32), int(length))

    return Source(chunk, batch_size, num_steps)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def copy_task(length: int = 5, num_symbols: int = 2, *, min_length: int | None = None) -> Task:
    """The copy task: see a pattern, then reproduce it after a delimiter.

    An episode has ``2 * length + 1`` steps: ``length`` random symbols (one-hot over
    ``num_symbols`` input channels), one delimiter step (the last input channel), then ``length``
    blank steps in which the targets are the pattern's symbols in order. Only the recall steps carry
    a loss. Episodes follow each other in the stream, each starting with a reset. Chance level is a
    cross-entropy of ``log(num_symbols)`` per recall step.

    With ``min_length`` below ``length`` every episode draws its own pattern length uniformly from
    ``min_length .. length``, as in the length curricula of Graves et al. 2016 ("Hybrid computing
    using a neural network with dynamic external memory", Nature 538) and Menick et al. 2020
    (arXiv:2006.07232), which draw lengths ``1 .. L`` at curriculum level ``L``: the network keeps
    practising the short patterns and cannot count on the recall starting at one fixed step. The
    episodes' boundaries then depend on every earlier length, so such a task draws whole streams
    only (``window`` is ``None``).

    Args:
      length: symbols per pattern (the longest, with ``min_length``).
      num_symbols: alphabet size (2 for bits).
      min_length: the shortest pattern; ``None`` (or ``length``) for patterns of ``length`` each.
    """
    _check_positive("copy length", length)
    _check_positive("copy num_symbols", num_symbols)
    if num_symbols < 2:
        raise ValueError(f"copy num_symbols must be >= 2, got {num_symbols}.")
    if min_length is not None and min_length != length:
        _check_positive("copy min_length", min_length)
        if min_length > length:
            raise ValueError(f"copy min_length must be <= length ({length}), got {min_length}.")
        return _variable_copy_task(min_length, length, num_symbols)
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

    def window_step(key, step):
        episode_index, phase = jnp.divmod(step, episode)
        symbols = jax.random.randint(jax.random.fold_in(key, episode_index), (length,), 0, num_symbols)
        return _copy_step(symbols, length, phase, num_symbols)

    def window(key, start, num_steps):
        return jax.vmap(window_step, in_axes=(None, 0))(key, start + jnp.arange(num_steps))

    return Task(f"copy(length={length})", num_symbols + 1, num_symbols, sample, True, window)


def _copy_step(symbols: jax.Array, length: jax.Array | int, phase: jax.Array, num_symbols: int) -> Stream:
    """Step ``phase`` of a copy episode whose pattern is ``symbols[:length]`` (one stream step)."""
    last = symbols.shape[0] - 1
    shown = jnp.where(phase == length, num_symbols, symbols[jnp.clip(phase, 0, last)])
    inputs = jax.nn.one_hot(shown, num_symbols + 1, dtype=jnp.float32) * (phase <= length)
    recall = phase > length
    recalled = symbols[jnp.clip(phase - length - 1, 0, last)]
    targets = jax.nn.one_hot(recalled, num_symbols, dtype=jnp.float32) * recall
    return Stream(inputs, targets, recall.astype(jnp.float32), phase == 0)


def _variable_copy_task(min_length: int, max_length: int, num_symbols: int) -> Task:
    """:func:`copy_task` with each episode's pattern length uniform in ``min_length .. max_length``."""

    def sample(key, num_steps):
        num_episodes = -(-num_steps // (2 * min_length + 1))  # enough for the shortest episodes
        key_lengths, key_symbols = jax.random.split(key)
        lengths = jax.random.randint(key_lengths, (num_episodes,), min_length, max_length + 1)
        symbols = jax.random.randint(key_symbols, (num_episodes, max_length), 0, num_symbols)
        starts = jnp.cumsum(2 * lengths + 1) - (2 * lengths + 1)
        first = jnp.zeros(num_steps, jnp.int32).at[starts].set(1, mode="drop")
        episode_index = jnp.cumsum(first) - 1
        phase = jnp.arange(num_steps) - starts[episode_index]
        return jax.vmap(_copy_step, in_axes=(0, 0, 0, None))(
            symbols[episode_index], lengths[episode_index], phase, num_symbols
        )

    name = f"copy(length={min_length}..{max_length})"
    return Task(name, num_symbols + 1, num_symbols, sample, True)


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

    def coin(key, step):
        return jnp.where(step >= 0, jax.random.bernoulli(jax.random.fold_in(key, step), 0.5), False)

    def window(key, start, num_steps):
        steps = start + jnp.arange(num_steps)
        x, x1, x2 = (jax.vmap(coin, in_axes=(None, 0))(key, steps - lag) for lag in (0, t1, t2))
        x, x1, x2 = (a.astype(jnp.float32) for a in (x, x1, x2))
        y = 0.5 + 0.5 * x1 - 0.25 * x2
        return Stream(
            inputs=jnp.stack([x, 1.0 - x], axis=-1),
            targets=jnp.stack([y, 1.0 - y], axis=-1),
            mask=jnp.ones((num_steps,), jnp.float32),
            reset=steps == 0,
        )

    return Task(f"add(t1={t1},t2={t2})", 2, 2, sample, False, window)


def evidence_task(
    num_cues: int = 3,
    cue_steps: int = 4,
    gap_steps: int = 4,
    delay_steps: int = 10,
    recall_steps: int = 4,
    channels: int = 4,
    rate: float = 0.5,
    noise_rate: float = 0.05,
) -> Task:
    """Evidence accumulation with spike-train inputs (Bellec et al. 2020, after Morcos & Harvey 2016).

    An episode shows ``num_cues`` cues, each on the left or the right side with probability ½ for
    ``cue_steps`` steps followed by ``gap_steps`` silent steps, then ``delay_steps`` silent steps,
    then a recall cue for ``recall_steps`` steps during which the target is the side that had more
    cues (``num_cues`` is odd, so there is no tie); only the recall steps carry a loss. The input
    has four groups of ``channels`` channels: left cues, right cues, the recall cue and background
    noise; a channel of an active group spikes (input 1) with probability ``rate`` per step, a
    noise channel with probability ``noise_rate`` at every step. Episodes follow each other in the
    stream, each starting with a reset. Chance is ``log 2`` nats per recall step; remembering only
    the last cue is right with probability ``½ + C(n−1, (n−1)/2) / 2ⁿ`` (0.75 for 3 cues).

    ``sample`` and ``window`` agree (``sample(key, T)`` is ``window(key, 0, T)``).

    Args:
      num_cues: cues per episode (odd).
      cue_steps: steps a cue lasts.
      gap_steps: silent steps after each cue.
      delay_steps: silent steps between the last cue's gap and the recall cue.
      recall_steps: steps of the recall cue (the decision steps).
      channels: input channels per group (the input has ``4 * channels`` features).
      rate: spike probability per step of a channel of an active group.
      noise_rate: spike probability per step of a background channel.

    Reference: G. Bellec et al., Nature Communications 11:3625, 2020, arXiv:1901.09049 (Fig. 3).
    """
    for name, value in (("num_cues", num_cues), ("cue_steps", cue_steps), ("recall_steps", recall_steps)):
        _check_positive(f"evidence {name}", value)
    _check_positive("evidence channels", channels)
    for name, value in (("gap_steps", gap_steps), ("delay_steps", delay_steps)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"evidence {name} must be a non-negative integer, got {value!r}.")
    if num_cues % 2 == 0:
        raise ValueError(f"evidence num_cues must be odd (no ties), got {num_cues}.")
    for name, probability in (("rate", rate), ("noise_rate", noise_rate)):
        if not 0.0 <= float(probability) <= 1.0:
            raise ValueError(f"evidence {name} must be a probability in [0, 1], got {probability!r}.")
    period = cue_steps + gap_steps
    recall_start = num_cues * period + delay_steps
    episode = recall_start + recall_steps

    def window_step(key, step):
        episode_index, phase = jnp.divmod(step, episode)
        episode_key = jax.random.fold_in(key, episode_index)
        sides = jax.random.bernoulli(jax.random.fold_in(episode_key, 0), 0.5, (num_cues,))
        cue, within = jnp.divmod(phase, period)
        cue_on = (cue < num_cues) & (within < cue_steps)
        right = sides[jnp.minimum(cue, num_cues - 1)]
        recall = phase >= recall_start
        active = jnp.stack([cue_on & ~right, cue_on & right, recall])
        rates = jnp.concatenate([jnp.repeat(rate * active, channels), jnp.full((channels,), noise_rate)])
        uniform = jax.random.uniform(jax.random.fold_in(episode_key, 1 + phase), (4 * channels,))
        inputs = (uniform < rates).astype(jnp.float32)
        majority = (2 * jnp.sum(sides) > num_cues).astype(jnp.int32)
        targets = jax.nn.one_hot(majority, 2, dtype=jnp.float32) * recall
        return Stream(inputs, targets, recall.astype(jnp.float32), phase == 0)

    def window(key, start, num_steps):
        return jax.vmap(window_step, in_axes=(None, 0))(key, start + jnp.arange(num_steps))

    def sample(key, num_steps):
        return window(key, 0, num_steps)

    name = f"evidence(num_cues={num_cues},delay_steps={delay_steps})"
    return Task(name, 4 * channels, 2, sample, True, window)


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
