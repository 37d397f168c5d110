"""The whole Flax model a run spec describes: encoder, online recurrent layers, norms, residuals, head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from rtrl_jax._src.layers import OnlineRNN
from rtrl_jax.experiment.names import NORMS


class OnlineStack(nn.Module):
    """An optional Dense encoder, online recurrent layers (bottom first) and a linear or MLP head.

    Every layer is an :class:`~rtrl_jax.OnlineRNN` named ``rnn<i>`` with its own estimator and
    trace; under ``jax.grad`` of a step's loss each layer's parameters get ``c_t · J_t`` and the
    layers and encoder below get the current-step input cotangent (see ``rtrl_jax.OnlineRNN``).

    Attributes:
      cells: the linen recurrent cells, bottom first.
      estimators: each layer's registered estimator name.
      options: each layer's estimator options.
      num_outputs: the head's outputs.
      embedding: units of the Dense encoder ``embedding`` in front of the first layer (0: none).
      head_hidden: units of the head's hidden ReLU layer ``head_hidden`` (0: a linear head).
      residual: adds each layer's input to its output, for every layer above the first.
      norm: a :data:`~rtrl_jax.experiment.names.NORMS` name, the norm ``norm<i>`` after every
        layer (after the residual).

    Call args:
      x: ``(batch, features)`` inputs of one step.
      reset: optional ``(batch,)`` booleans: the streams that start an episode at this step.

    Returns:
      ``(batch, num_outputs)`` outputs (logits).
    """

    cells: tuple[nn.Module, ...]
    estimators: tuple[str, ...]
    options: tuple[Mapping[str, Any], ...]
    num_outputs: int
    embedding: int = 0
    head_hidden: int = 0
    residual: bool = False
    norm: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, reset: jax.Array | None = None) -> jax.Array:
        if self.embedding:
            x = nn.Dense(self.embedding, name="embedding")(x)
        layers = zip(self.cells, self.estimators, self.options, strict=True)
        for i, (cell, estimator, options) in enumerate(layers):
            y = OnlineRNN(cell, estimator, options, name=f"rnn{i}")(x, reset)
            x = x + y if self.residual and i > 0 else y
            norm = NORMS[self.norm]
            if norm is not None:
                x = norm(name=f"norm{i}")(x)
        if self.head_hidden:
            x = nn.relu(nn.Dense(self.head_hidden, name="head_hidden")(x))
        return nn.Dense(self.num_outputs, name="head")(x)
