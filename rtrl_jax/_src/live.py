"""The recommended step for data that arrives one time step at a time.

When the next input exists only after the previous step ran (an environment reacting to the
model's output, a robot, a live feed), the run cannot be one ``jax.lax.scan``: Python calls a
jitted step once per time step. What such a call costs beyond its arithmetic is JAX's dispatch:
flattening the arguments, checking them against the compiled signature, handing the buffers to the
runtime and wrapping the outputs, roughly in proportion to the number of argument and output
leaves. :func:`live_step` keeps that at its floor:

- one compiled call per step: the whole train step (core, trace, loss, gradient, Optax update,
  metrics) is one jitted function, compiled at the first call and reused for every later one
  (inputs of the same shapes and dtypes, NumPy arrays or device arrays alike);
- the train state is donated (``donate_argnums=0``): XLA writes the new state into the old state's
  buffers, so no trace is copied or newly allocated per step and memory stays at one state;
- the per-step data are the only other arguments: ``inputs`` and ``targets`` (``mask`` and
  ``reset`` are built inside the compiled step when not given).

``benchmarks/online_loop.py`` times it against a trivial jitted function with the same argument
leaves (the dispatch floor) in one run.

Example::

    train_step = rj.make_train_step(core, estimator, optimizer)
    step = rj.live_step(train_step)
    for x, y in feed:                            # x: (batch, input), y: (batch, classes), NumPy ok
        state, metrics = step(state, x, y)       # `state` is consumed: use only the returned one

The same wraps :func:`~rtrl_jax.make_model_train_step` for a whole Flax model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rtrl_jax._src.tasks import Stream

TrainStep = Callable[[Any, Stream], tuple[Any, Any]]


def live_step(train_step: TrainStep) -> Callable[..., tuple[Any, Any]]:
    """``train_step`` jitted for one call per time step, with the state donated.

    Args:
      train_step: ``(state, batch) -> (state, metrics)`` for a :class:`~rtrl_jax.Stream` slice of
        one time step (leading axis batch), e.g. from :func:`~rtrl_jax.make_train_step` or
        :func:`~rtrl_jax.make_model_train_step`.

    Returns:
      ``step(state, inputs, targets, mask=None, reset=None) -> (state, metrics)``, jitted, with
      ``state`` donated (its buffers are reused for the returned state: do not read the old one
      afterwards). ``inputs`` and ``targets`` have leading axis batch; ``mask`` (default all ones)
      weights each stream's loss; ``reset`` (default all ``False``) marks streams whose episode
      starts at this step.
    """

    def step(state, inputs, targets, mask=None, reset=None):
        batch_size = jax.tree.leaves(inputs)[0].shape[0]
        if mask is None:
            mask = jnp.ones((batch_size,), jnp.result_type(*jax.tree.leaves(targets), jnp.float32))
        if reset is None:
            reset = jnp.zeros((batch_size,), bool)
        return train_step(state, Stream(inputs=inputs, targets=targets, mask=mask, reset=reset))

    return jax.jit(step, donate_argnums=0)
