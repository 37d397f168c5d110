"""Named recurrent cells for configs and the command line, and the core a config describes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from rtrl_jax._src import cells
from rtrl_jax._src.cores import Core, from_linen

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
}


def register_cell(name: str, make: Callable[[int], Any]) -> None:
    """Makes ``make(hidden) -> linen cell`` available to configs as ``model.cell: name``."""
    if name in CELLS:
        raise ValueError(f"a cell named {name!r} is already registered.")
    CELLS[name] = make


def build_core(config: Any, input_size: int) -> Core:
    """The core of ``config.model`` for inputs of ``input_size`` features."""
    return from_linen(CELLS[config.model.cell](config.model.hidden), input_size, name=config.model.cell)
