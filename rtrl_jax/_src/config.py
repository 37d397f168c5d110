"""Run configuration: a typed schema, YAML files, dotted ``key=value`` overrides, validation.

A configuration is checked entirely before anything is compiled: unknown keys, wrong types, values
out of range, unknown estimator / cell / task names, unknown estimator or task options, and
estimator-cell combinations that cannot work each raise :class:`ConfigError` naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The recurrent cell.

    Attributes:
      cell: a registered cell name (``rtrl-jax estimators`` lists them).
      hidden: hidden units.
      dtype: ``float32`` or ``float64``.
    """

    cell: str = "gru"
    hidden: int = 32
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The online training loop.

    Attributes:
      steps: stream steps.
      batch_size: independent streams trained together.
      optimizer: an Optax optimizer name (``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad``).
      learning_rate: its learning rate (> 0).
      update_every: apply the update every k steps (``optax.MultiSteps``; 1 = every step).
      chunk_size: steps per jitted chunk between progress reports.
      seed: the random seed of parameters, data and estimator noise.
      checkpoint_every: save a checkpoint every this many steps (a multiple of ``chunk_size``;
        0: only at the end and on interrupt).
      keep_checkpoints: how many checkpoints to keep (>= 1).
      nonfinite: what a step with a NaN or infinity in the loss, gradient, carry, trace or updated
        parameters does: ``skip`` (no update, carries and traces restarted, the run goes on),
        ``stop`` (the same, then the run stops) or ``ignore``.
    """

    steps: int = 8000
    batch_size: int = 8
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    update_every: int = 1
    chunk_size: int = 250
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    nonfinite: str = "skip"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run.

    Attributes:
      estimator: a registered estimator name.
      estimator_options: keyword options of the estimator (e.g. ``{rank: 2}``, ``{window: 10}``).
      task: a task name (``copy``, ``add``).
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


OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
NONFINITE_POLICIES = ("skip", "stop", "ignore")
DTYPES = ("float32", "float64")
_POSITIVE = {
    "model.hidden",
    "train.steps",
    "train.batch_size",
    "train.update_every",
    "train.chunk_size",
    "train.learning_rate",
    "train.keep_checkpoints",
}
_NON_NEGATIVE = {"train.checkpoint_every", "train.seed"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}.")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}.")
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
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, f"{key}.")
        else:
            values[name] = _check_type(key, value, tp)
            if key in _POSITIVE and values[name] <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value!r}.")
            if key in _NON_NEGATIVE and values[name] < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value!r}.")
    return cls(**values)


def validate(config: RunConfig) -> RunConfig:
    """Checks names and combinations that need the registries; returns ``config`` unchanged."""
    from rtrl_jax._src import models, tasks
    from rtrl_jax._src.registry import get_estimator_info, make_estimator, registered

    names = [e.name for e in registered()]
    if config.estimator not in names:
        raise ConfigError(f"estimator: unknown estimator {config.estimator!r}; allowed: {', '.join(names)}.")
    if config.task not in tasks.TASKS:
        raise ConfigError(f"task: unknown task {config.task!r}; allowed: {', '.join(tasks.TASKS)}.")
    if config.model.cell not in models.CELLS:
        raise ConfigError(
            f"model.cell: unknown cell {config.model.cell!r}; allowed: {', '.join(models.CELLS)}."
        )
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {config.model.dtype!r} is not one of {', '.join(DTYPES)}.")
    try:
        task = tasks.TASKS[config.task](**config.task_options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"task_options: {error}") from None
    core = models.build_core(config, task.input_size)
    reason = get_estimator_info(config.estimator).unsupported_reason(core)
    if reason is not None:
        able = [e.name for e in registered() if e.unsupported_reason(core) is None]
        raise ConfigError(
            f"estimator: {config.estimator!r} cannot serve cell {config.model.cell!r} ({reason});"
            f" estimators that can: {', '.join(able)}."
        )
    try:
        make_estimator(config.estimator, core, **config.estimator_options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"estimator_options: {error}") from None
    if config.train.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer: unknown optimizer {config.train.optimizer!r};"
            f" allowed: {', '.join(OPTIMIZERS)}."
        )
    if config.train.nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(
            f"train.nonfinite: unknown policy {config.train.nonfinite!r};"
            f" allowed: {', '.join(NONFINITE_POLICIES)}."
        )
    every, chunk = config.train.checkpoint_every, config.train.chunk_size
    if every % chunk:
        raise ConfigError(
            f"train.checkpoint_every: {every} is not a multiple of train.chunk_size={chunk}"
            " (checkpoints are taken at chunk ends); allowed: 0 or a multiple of the chunk size."
        )
    return config


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


def _set(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section.")
        tree = node
    tree[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Reads a YAML config (or the embedded default), applies ``key=value`` overrides, validates.

    Args:
      path: a YAML file, or ``None`` for the default :class:`RunConfig`.
      overrides: dotted ``key=value`` strings applied in order.

    Returns:
      A validated :class:`RunConfig`.

    Raises:
      ConfigError: for a missing or unreadable file or any invalid key or value.
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
        _set(data, key, value)
    return validate(_build(RunConfig, data, ""))


def to_dict(config: RunConfig) -> dict:
    """The config as plain data (for YAML/JSON)."""
    return dataclasses.asdict(config)
