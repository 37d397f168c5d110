"""A train state for a hand-written online loop, in the style of ``flax.training.train_state``.

:class:`RecurrentTrainState` is Flax's ``TrainState`` (``step``, ``apply_fn``, ``params``, ``tx``,
``opt_state``, ``apply_gradients``) plus what an online recurrent learner carries between steps: the
carry and the estimator's trace. With the drop-in :func:`~rtrl_jax.online_step`, a user's loop is::

    state = RecurrentTrainState.create(apply_fn=core, params=params, tx=optax.adam(1e-3),
                                       estimator=rtrl(core))
    step = online_step(core, state.estimator)

    def loss(params, state, x, y):
        carry, out, trace = step(params, state.trace, state.carry, x, None)
        return xent(out, y), (carry, trace)

    (value, (carry, trace)), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state, x, y)
    state = state.apply_gradients(grads=grads).replace(carry=carry, trace=trace)
"""

from __future__ import annotations

from typing import Any

from flax import struct
from flax.training import train_state

from rtrl_jax._src.base import Estimator


class RecurrentTrainState(train_state.TrainState):
    """Flax's ``TrainState`` with the carry and the estimator trace of an online learner.

    Attributes:
      carry: the core's carry (one stream, or a batch under ``jax.vmap``).
      trace: the estimator's trace for that carry.
      estimator: the estimator (static: not a pytree leaf).
    """

    carry: Any
    trace: Any
    estimator: Estimator = struct.field(pytree_node=False)

    @classmethod
    def create(  # type: ignore[override]  # TrainState.create plus the estimator it needs
        cls, *, apply_fn, params, tx, estimator: Estimator, carry=None, key=None, **kwargs
    ):
        """A fresh state: the optimizer initialised on ``params`` and a fresh trace for ``carry``.

        Args:
          apply_fn: the core (an :class:`~rtrl_jax.Core` or any step function).
          params: the core's parameters.
          tx: an ``optax.GradientTransformation``.
          estimator: an estimator built for the core.
          carry: the initial carry (default: ``apply_fn.initial_carry()`` of a Core).
          key: the key for the trace's initialisation (stochastic estimators).
        """
        if carry is None:
            if not hasattr(apply_fn, "initial_carry"):
                raise ValueError("pass carry= (apply_fn is not an rtrl_jax.Core with initial_carry).")
            carry = apply_fn.initial_carry()
        trace = estimator.init(params, carry, key=key)
        return super().create(
            apply_fn=apply_fn, params=params, tx=tx, carry=carry, trace=trace, estimator=estimator, **kwargs
        )
