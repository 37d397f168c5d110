"""The experiment spec: the YAML schema as dataclasses, read from files and dotted overrides.

:func:`load_config` and :func:`load_compare_config` check the shape of a spec: known keys, types and
ranges. Names (estimator, task, cell, optimizer, ...) and combinations are checked where they are
used, by :func:`rtrl_jax.experiment.build`, which raises the same :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model: recurrent layers, an optional encoder, norms and residuals, and a head.

    With every key but ``cell``, ``hidden``, ``dtype`` and ``feedback`` at its default the model is
    one recurrent core and a linear softmax readout, trained by the core+head trainer. Any other
    value makes it a whole Flax model (:class:`~rtrl_jax.experiment.OnlineStack`): an optional
    Dense encoder, then ``layers`` online recurrent layers (bottom first), each with its own trace
    and estimator, then the head; gradients cross layers at the current step only (``rtrl_jax.OnlineRNN``).

    The ``layer_*`` lists are per layer, bottom first; empty means every layer takes the shared
    value (``cell``, ``hidden``, the run's ``estimator``). A given list has one entry per layer.

    Attributes:
      cell: a registered cell name (``rtrl-jax estimators`` lists them): every layer's unless
        ``layer_cells`` names them.
      hidden: hidden units: every layer's unless ``layer_hidden`` gives them.
      dtype: ``float32`` or ``float64``.
      layers: the number of recurrent layers (>= 1).
      layer_cells: each layer's cell name, e.g. ``[gru, simple]``.
      layer_hidden: each layer's hidden units, e.g. ``[64, 16]``.
      layer_estimators: each layer's registered estimator, e.g. ``[snap, rtrl]`` (SnAp-1 on the
        bottom layer, exact RTRL on the top one).
      layer_estimator_options: each layer's estimator options, e.g. ``[{n: 2}, {}]``; empty: the
        run's ``estimator_options`` for the layers whose estimator is the run's ``estimator``, no
        options for the others.
      embedding: units of a Dense encoder in front of the first layer (0: none). It gets the
        current-step gradient only.
      head: ``linear`` (a Dense readout) or ``mlp`` (a ReLU layer of ``head_hidden`` units, then
        the readout).
      head_hidden: units of the MLP head's hidden layer (0: the top layer's output width).
      feedback: the matrix through which the readout sends the learning signal (the cotangent
        ``c_t = B ∂L_t/∂y_t`` on the core's output) to the estimator: ``symmetric`` (``B = W``, the
        readout kernel: the true gradient), ``random`` (``B`` drawn once and fixed, random e-prop /
        feedback alignment: the optimizer leaves it unchanged, weight decay included) or
        ``adaptive`` (``B`` gets the readout kernel's gradient and update, adaptive e-prop), see
        :func:`rtrl_jax.feedback_head`. It applies to every estimator. ``random`` and ``adaptive``
        need the one-core model (every other whole-model key at its default).
      residual: adds each layer's input to its output, for every layer above the first (their
        input and output widths must match).
      norm: ``none``, ``layer`` (LayerNorm) or ``rms`` (RMSNorm) after every recurrent layer (after
        the residual).
      traces: ``per_layer`` (a trace per layer, gradients across layers at the current step) or
        ``stack``: the layers and the norms between them folded into ONE core
        (``rtrl_jax.StackedCell``) with one trace of the run's ``estimator`` over every layer's
        parameters, keeping the cross-layer paths through time (with ``rtrl``: exact BPTT, at the
        whole stack's cost); no per-layer estimators or residuals then.
    """

    cell: str = "gru"
    hidden: int = 32
    dtype: str = "float32"
    layers: int = 1
    layer_cells: list = dataclasses.field(default_factory=list)
    layer_hidden: list = dataclasses.field(default_factory=list)
    layer_estimators: list = dataclasses.field(default_factory=list)
    layer_estimator_options: list = dataclasses.field(default_factory=list)
    embedding: int = 0
    head: str = "linear"
    head_hidden: int = 0
    feedback: str = "symmetric"
    residual: bool = False
    norm: str = "none"
    traces: str = "per_layer"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The online training loop.

    Attributes:
      steps: stream steps.
      batch_size: independent streams trained together.
      optimizer: an Optax optimizer name (``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad``).
      learning_rate: its learning rate (> 0).
      schedule: ``constant`` (the rate held), or ``cosine`` / ``linear`` (decayed from
        ``learning_rate`` to 0 over the run's ``steps // update_every`` updates, so that the final
        weights carry little of the last updates' noise).
      update_every: apply the update every k steps (``optax.MultiSteps``; 1 = every step).
      chunk_size: steps per jitted chunk between progress reports.
      seed: the random seed of parameters, data and estimator noise.
      checkpoint_every: save a checkpoint every this many steps (a multiple of ``chunk_size``;
        0: only at the end and on interrupt).
      keep_checkpoints: how many checkpoints to keep (>= 1).
      nonfinite: what a step with a NaN or infinity in the loss, gradient, carry, trace or updated
        parameters does: ``skip`` (no update, carries and traces restarted, the run goes on),
        ``stop`` (the same, then the run stops) or ``ignore``.
      max_memory: the memory a run may use, e.g. ``8GiB`` or ``512MB``; ``""`` (default): the
        memory available on the device (on the CPU, ``MemAvailable`` of ``/proc/meminfo``);
        ``none``: no limit. A run whose estimated peak exceeds it is refused before anything is
        allocated or compiled, naming the estimators that would fit.
    """

    steps: int = 8000
    batch_size: int = 8
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    schedule: str = "constant"
    update_every: int = 1
    chunk_size: int = 250
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    nonfinite: str = "skip"
    max_memory: str | int = ""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run (``rtrl-jax train``).

    Attributes:
      estimator: a registered estimator name.
      estimator_options: keyword options of the estimator (e.g. ``{rank: 2}``, ``{window: 10}``).
      task: a task name (``copy``, ``add``, ``char``).
      task_options: keyword options of the task (e.g. ``{length: 5}``).
      model: the cell.
      train: the loop.
    """

    estimator: str = "rtrl"
    estimator_options: dict = dataclasses.field(default_factory=dict)
    task: str = "copy"
    task_options: dict = dataclasses.field(default_factory=dict)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """A gradient-quality comparison (``rtrl-jax compare``).

    Attributes:
      estimators: ``{label: options}``; the label is the registry name unless the options hold
        ``estimator: name`` (e.g. ``ok2: {estimator: ok, rank: 2}``).
      task: a task name; its stream is the shared trajectory (the readout head is random and frozen).
      task_options: keyword options of the task.
      model: the cell (default: a 16-unit ``simple`` cell); its ``feedback`` sets the learning
        signal of every estimator and of the exact reference alike.
      steps: length of the trajectory.
      num_keys: random keys (estimator noise) vmapped over; bias and variance need ``≥ 2``.
      windows: window sizes for the windowed alignment.
      train_with: ``""`` for frozen parameters, or a label (or ``exact``) whose gradient drives SGD.
      learning_rate: the SGD step size when ``train_with`` is set.
      seed: parameters, head and stream.
    """

    estimators: dict = dataclasses.field(
        default_factory=lambda: {"uoro": {}, "kf": {}, "ok": {"rank": 2}, "tbptt": {"window": 10}}
    )
    task: str = "add"
    task_options: dict = dataclasses.field(default_factory=dict)
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(cell="simple", hidden=16))
    steps: int = 500
    num_keys: int = 8
    windows: list = dataclasses.field(default_factory=lambda: [1, 10, 100])
    train_with: str = ""
    learning_rate: float = 0.0
    seed: int = 0


_POSITIVE = {
    "model.hidden",
    "model.layers",
    "train.steps",
    "train.batch_size",
    "train.update_every",
    "train.chunk_size",
    "train.learning_rate",
    "train.keep_checkpoints",
}
_NON_NEGATIVE = {"train.checkpoint_every", "train.seed", "model.embedding", "model.head_hidden"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}.")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}.")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    return value


def from_data(cls: type, data: Any, prefix: str = "") -> Any:
    """The spec dataclass ``cls`` from plain data: unknown keys, wrong types and ranges raise.

    Args:
      cls: a spec dataclass (:class:`RunConfig`, :class:`CompareConfig`, ...).
      data: a mapping of its fields (nested mappings for nested dataclasses); missing fields take
        their defaults.
      prefix: the dotted key of ``data`` in the whole spec (for messages).

    Raises:
      ConfigError: naming the key, the value and what is allowed.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown key {key!r}; allowed keys here: {', '.join(fields)}.")
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            values[name] = from_data(tp, value, f"{key}.")
        else:
            values[name] = _check_type(key, value, tp)
            if key in _POSITIVE and values[name] <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value!r}.")
            if key in _NON_NEGATIVE and values[name] < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value!r}.")
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.hidden=64"`` -> ``(["model", "hidden"], 64)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=2000).")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: cannot read the value: {error}") from None
    return key.split("."), value


def set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    """Sets ``tree[path[0]][path[1]]... = value``, making the sections on the way."""
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section.")
        tree = node
    tree[path[-1]] = value


def read_yaml(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """The mapping in a YAML file (``{}`` for ``None``) with dotted ``key=value`` overrides applied.

    Raises:
      ConfigError: a missing or unreadable file, a file without a mapping at the top level, or a
        malformed override.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level.")
    for text in overrides:
        key, value = parse_override(text)
        set_path(data, key, value)
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML run config (or the embedded default) and applies ``key=value`` overrides.

    Args:
      path: a YAML file, or ``None`` for the default :class:`RunConfig`.
      overrides: dotted ``key=value`` strings applied in order.

    Returns:
      A :class:`RunConfig` with known keys, types and ranges; :func:`rtrl_jax.experiment.build`
      checks its names and combinations.

    Raises:
      ConfigError: for a missing or unreadable file or any unknown key, wrong type or value out of
        range.
    """
    return from_data(RunConfig, read_yaml(path, overrides))


def load_compare_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CompareConfig:
    """Reads a YAML comparison config (or the embedded default) and applies ``key=value`` overrides.

    Keys the file leaves out of ``model`` take the comparison's defaults (a 16-unit ``simple`` cell).

    Raises:
      ConfigError: for a missing file, unknown keys, wrong types, an empty ``estimators``,
        ``steps`` or ``num_keys`` below 1, non-positive ``windows``, or a ``train_with`` that is not
        a label or ``exact``.
    """
    data = read_yaml(path, overrides)
    model = data.setdefault("model", {})
    if isinstance(model, dict):
        defaults = CompareConfig().model
        model.setdefault("cell", defaults.cell)
        model.setdefault("hidden", defaults.hidden)
    config = from_data(CompareConfig, data)
    if config.steps < 1 or config.num_keys < 1:
        raise ConfigError("steps and num_keys must be >= 1.")
    if not config.estimators:
        raise ConfigError("estimators: give at least one estimator.")
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in config.windows):
        raise ConfigError(f"windows: expected positive integers, got {config.windows!r}.")
    if config.train_with and config.train_with not in (*config.estimators, "exact"):
        raise ConfigError(f"train_with: {config.train_with!r} is not one of {[*config.estimators, 'exact']}.")
    return config


def to_dict(config: Any) -> dict:
    """A spec as plain data (for YAML / JSON)."""
    return dataclasses.asdict(config)
