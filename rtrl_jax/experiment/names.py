"""The names a spec may use: cells, tasks, optimizers, dtypes, heads, norms, trace layouts and
non-finite policies.

Estimators are named by the library's registry (:func:`rtrl_jax.registered`); the tables here are
the experiment layer's own. :func:`register_cell` and :func:`register_task` add entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from rtrl_jax._src import cells, spiking
from rtrl_jax._src.tasks import Task, add_task, copy_task, evidence_task
from rtrl_jax._src.text import char_task
from rtrl_jax._src.trainer import NONFINITE_POLICIES

CELLS: dict[str, Callable[[int], Any]] = {
    "simple": lambda hidden: nn.SimpleCell(features=hidden),
    "gru": lambda hidden: nn.GRUCell(features=hidden),
    "lstm": lambda hidden: nn.LSTMCell(features=hidden),
    "optimized_lstm": lambda hidden: nn.OptimizedLSTMCell(features=hidden),
    "mgu": lambda hidden: nn.MGUCell(features=hidden),
    "lru": lambda hidden: cells.LRUCell(features=hidden),
    "elstm": lambda hidden: cells.ELSTMCell(features=hidden),
    "leaky": lambda hidden: cells.LeakyRNNCell(features=hidden),
    "sparse_rnn": lambda hidden: cells.SparseRNNCell(features=hidden),
    "sparse_gru": lambda hidden: cells.SparseGRUCell(features=hidden),
    "lif": lambda hidden: spiking.LIFCell(features=hidden),
    "alif": lambda hidden: spiking.ALIFCell(features=hidden),
}
"""``model.cell`` names: ``make(hidden) -> linen cell``."""

TASKS: dict[str, Callable[..., Task]] = {
    "copy": copy_task,
    "add": add_task,
    "char": char_task,
    "evidence": evidence_task,
}
"""``task`` names: ``make(**task_options) -> Task``."""

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
"""``train.optimizer`` names: Optax optimizers taking the learning rate as their first argument."""

SCHEDULES = ("constant", "cosine", "linear")
"""``train.schedule`` names: the learning rate held, or decayed to 0 over the run (cosine or linear)."""

DTYPES = ("float32", "float64")
"""``model.dtype`` names."""

HEADS = ("linear", "mlp")
"""``model.head`` names: a Dense readout, or a ReLU layer then the readout."""

NORMS: dict[str, Callable[..., Any] | None] = {"none": None, "layer": nn.LayerNorm, "rms": nn.RMSNorm}
"""``model.norm`` names: ``make(name=...) -> linen norm`` after every recurrent layer (``none``: no norm)."""

TRACES = ("per_layer", "stack")
"""``model.traces`` names: a trace per recurrent layer, or one for the whole stack as one core."""

__all__ = [
    "CELLS",
    "DTYPES",
    "HEADS",
    "NONFINITE_POLICIES",
    "NORMS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TASKS",
    "TRACES",
    "register_cell",
    "register_task",
]


def _register(table: dict, what: str, name: str, make: Callable[..., Any]) -> None:
    if name in table:
        raise ValueError(f"a {what} named {name!r} is already registered.")
    table[name] = make


def register_cell(name: str, make: Callable[[int], Any]) -> None:
    """Makes ``make(hidden) -> linen cell`` available to specs as ``model.cell: name``."""
    _register(CELLS, "cell", name, make)


def register_task(name: str, make: Callable[..., Task]) -> None:
    """Makes ``make(**task_options) -> Task`` available to specs as ``task: name``."""
    _register(TASKS, "task", name, make)
