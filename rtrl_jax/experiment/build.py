"""``build(spec)``: everything a spec describes, constructed once; every failure is a :class:`ConfigError`.

Building is the validation: each piece is made from its part of the spec, and whatever cannot be
made (an unknown name, a bad option, an estimator that cannot serve the cell, ...) stops with a
:class:`ConfigError` that names the key, the value and what is allowed. The pieces
(:func:`build_task`, :func:`build_core`, :func:`build_estimator`, :func:`build_optimizer`,
:func:`build_head`, :func:`init_head`, :func:`enable_dtype`) serve ``rtrl-jax train``,
``rtrl-jax compare`` and the learning benchmarks alike; :func:`build_model` makes the whole Flax
model of a multi-layer spec.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, overload

import jax
import jax.numpy as jnp
import optax
from flax.core import FrozenDict

from rtrl_jax._src import registry
from rtrl_jax._src.base import Estimator
from rtrl_jax._src.cores import Core, cast_floating, from_linen
from rtrl_jax._src.feedback import FEEDBACK_KINDS, feedback_head
from rtrl_jax._src.layers import StackedCell, linen_online_core
from rtrl_jax._src.memory import available_memory, format_bytes, parse_bytes, tree_bytes
from rtrl_jax._src.registry import REQUIRED
from rtrl_jax._src.rtrl import rtrl
from rtrl_jax._src.tasks import Source, Stream, Task, sample_batch, task_source
from rtrl_jax._src.trainer import (
    Head,
    ModelTrainState,
    OnlineTrainState,
    init_model_train_state,
    init_train_state,
    linear_head,
)
from rtrl_jax.experiment import names
from rtrl_jax.experiment.names import CELLS, DTYPES, NONFINITE_POLICIES, OPTIMIZERS, SCHEDULES, TASKS
from rtrl_jax.experiment.spec import CompareConfig, ConfigError, ModelConfig, RunConfig
from rtrl_jax.experiment.stack import OnlineStack


def check_name(key: str, value: Any, allowed: Sequence[str], what: str) -> None:
    """Raises :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{key}: unknown {what} {value!r}; allowed: {', '.join(allowed)}.")


def estimator_names() -> list[str]:
    """The names of the registered estimators, in registration order."""
    return [info.name for info in registry.registered()]


def enable_dtype(name: str, *, key: str = "model.dtype") -> jnp.dtype:
    """The dtype ``name`` (``float32`` or ``float64``); ``float64`` switches on JAX's 64-bit mode."""
    if name not in DTYPES:
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(DTYPES)}.")
    dtype = jnp.dtype(name)
    if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)
    return dtype


def build_task(name: str, options: Mapping[str, Any], *, key: str = "task") -> Task:
    """The task ``name`` of :data:`~rtrl_jax.experiment.names.TASKS` made with ``options``.

    ``key`` is the spec key of the name; its options are ``<key>_options``.
    """
    check_name(key, name, list(TASKS), "task")
    make = TASKS[name]
    accepted = task_options(name)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(make).parameters.values()):
        unknown = sorted(set(options) - set(accepted))
        missing = sorted(o for o, default in accepted.items() if default is REQUIRED and o not in options)
        listed = ", ".join(f"{o} (required)" if d is REQUIRED else f"{o}={d!r}" for o, d in accepted.items())
        if unknown or missing:
            problem = f"unknown option(s) {unknown}" if unknown else f"missing option(s) {missing}"
            raise ConfigError(f"{key}_options: task {name!r}: {problem}; its options: {listed or 'none'}.")
    try:
        return make(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}_options: {error}") from None


def task_options(name: str) -> dict[str, Any]:
    """The keyword options of the task ``name`` with their defaults (``REQUIRED`` for required ones)."""
    parameters = inspect.signature(TASKS[name]).parameters.values()
    return {
        p.name: REQUIRED if p.default is inspect.Parameter.empty else p.default
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def absolute_paths(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with a ``path`` option made absolute, so a run folder works from any directory."""
    options = dict(options)
    if isinstance(options.get("path"), str):
        options["path"] = str(Path(options["path"]).expanduser().absolute())
    return options


def build_core(model: ModelConfig, input_size: int, *, key: str = "model.cell") -> Core:
    """The core of ``model`` (its ``cell`` and ``hidden``) for inputs of ``input_size`` features.

    ``key`` is the spec key of the cell name (for messages).
    """
    check_name(key, model.cell, list(CELLS), "cell")
    return from_linen(CELLS[model.cell](model.hidden), input_size, name=model.cell)


def build_estimator(
    name: str,
    options: Mapping[str, Any],
    core: Core,
    *,
    key: str = "estimator",
    options_key: str = "estimator_options",
) -> Estimator:
    """The registered estimator ``name`` with ``options`` for ``core``.

    Args:
      name: a registered estimator name.
      options: its keyword options.
      core: the core it serves.
      key: the spec key of ``name`` (for messages).
      options_key: the spec key of ``options`` (for messages).

    Raises:
      ConfigError: an unknown name, an estimator that cannot serve ``core`` (naming the estimators
        that can), or options it does not take or accept.
    """
    check_name(key, name, estimator_names(), "estimator")
    reason = registry.get_estimator_info(name).unsupported_reason(core)
    if reason is not None:
        raise ConfigError(f"{key}: {registry.unsupported_message(name, core, reason)}")
    try:
        return registry.make_estimator(name, core, **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{options_key}: {error}") from None


def build_optimizer(
    name: str,
    learning_rate: float,
    *,
    schedule: str = "constant",
    decay_steps: int = 0,
    update_every: int = 1,
    clip: float = 0.0,
    feedback: str = "symmetric",
    key: str = "train.optimizer",
) -> optax.GradientTransformation:
    """The Optax optimizer ``name`` at ``learning_rate``.

    ``schedule`` (:data:`SCHEDULES`) sets the rate of update ``k``: ``constant`` keeps
    ``learning_rate``; ``cosine`` takes ``learning_rate · ½(1 + cos(π k / K))`` and ``linear``
    ``learning_rate · (1 − k / K)``, both reaching 0 at ``K = decay_steps`` updates and staying
    there. With a constant rate the noise of the last online updates stays in the final weights; a
    rate decayed to 0 averages it out (Loshchilov & Hutter 2017, SGDR, arXiv:1608.03983, for the
    cosine form). ``clip > 0`` clips the global gradient norm before it; ``update_every > 1`` wraps it in
    ``optax.MultiSteps`` (the update is applied every k steps). With ``feedback="random"`` (the
    head of :func:`build_head`) the head's ``"feedback"`` matrix gets a zero update, so that it
    stays fixed under every optimizer, weight decay (``adamw``) included. The same arguments give
    the same (stateless) transformation, so specs built again reuse the trainer's compiled chunks.
    """
    check_name(key, name, OPTIMIZERS, "optimizer")
    schedule_key = key.removesuffix("optimizer") + "schedule"  # train.optimizer -> train.schedule
    check_name(schedule_key, schedule, SCHEDULES, "schedule")
    if schedule != "constant" and decay_steps < 1:
        raise ConfigError(f"{schedule_key}: {schedule} needs decay_steps >= 1, got {decay_steps}.")
    optimizer = _optimizer(name, learning_rate, schedule, decay_steps, update_every, clip)
    return _fixed_feedback(optimizer) if feedback == "random" else optimizer


def _learning_rate(learning_rate: float, schedule: str, decay_steps: int) -> float | optax.Schedule:
    if schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, decay_steps)
    if schedule == "linear":
        return optax.linear_schedule(learning_rate, 0.0, decay_steps)
    return learning_rate


@functools.lru_cache(maxsize=64)
def _optimizer(
    name: str, learning_rate: float, schedule: str, decay_steps: int, update_every: int, clip: float
) -> optax.GradientTransformation:
    optimizer = getattr(optax, name)(_learning_rate(learning_rate, schedule, decay_steps))
    if clip:
        optimizer = optax.chain(optax.clip_by_global_norm(clip), optimizer)
    if update_every > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=update_every)
    return optimizer


def _is_feedback(path: tuple) -> bool:
    """Whether a leaf at ``path`` of ``{"core": ..., "head": ...}`` is the head's feedback matrix."""
    return [getattr(entry, "key", None) for entry in path[:2]] == ["head", "feedback"]


@functools.lru_cache(maxsize=64)
def _fixed_feedback(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` on every parameter but the head's feedback matrix, which gets a zero update."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "fixed" if _is_feedback(path) else "trained", params
        )

    return optax.multi_transform({"trained": optimizer, "fixed": optax.set_to_zero()}, labels)


FEEDBACK = ("symmetric", *FEEDBACK_KINDS)
"""``model.feedback`` names: the readout kernel, or a random or adaptive feedback matrix."""


def build_head(feedback: str = "symmetric", *, key: str = "model.feedback") -> Head:
    """The linear softmax readout whose learning signal goes through ``feedback``.

    Args:
      feedback: ``symmetric`` (:func:`~rtrl_jax.linear_head`: the readout kernel, the true
        gradient), ``random`` or ``adaptive`` (:func:`~rtrl_jax.feedback_head`: a fixed random
        feedback matrix, or one that gets the readout kernel's gradient).
      key: the spec key of ``feedback`` (for messages).

    Raises:
      ConfigError: an unknown feedback, naming ``key`` and the allowed values.
    """
    check_name(key, feedback, FEEDBACK, "feedback")
    return linear_head() if feedback == "symmetric" else feedback_head(feedback)


def init_head(
    key: jax.Array, core: Core, num_classes: int, dtype: Any, feedback: str = "symmetric"
) -> tuple[Head, Any]:
    """The readout of :func:`build_head` on ``core``'s output and its parameters."""
    head = build_head(feedback)
    return head, head.init(key, core.output_shape[-1], num_classes, dtype)


class Layer(NamedTuple):
    """One recurrent layer of a whole model, as built.

    Attributes:
      cell: the cell's name.
      hidden: its hidden units.
      estimator: the estimator's name.
      options: the estimator's options.
      input_size: the features the layer reads.
      output_size: the features it writes.
    """

    cell: str
    hidden: int
    estimator: str
    options: dict
    input_size: int
    output_size: int


class MemoryEstimate(NamedTuple):
    """The memory of a run, estimated from shapes before anything is allocated.

    A jitted step holds the train state it reads, the state it writes and temporaries of about one
    state more, so the peak of a step is estimated as three train states (within 2× of XLA's
    ``memory_analysis()`` of the compiled step for the shipped estimators).

    Attributes:
      state_bytes: the train state (parameters, optimizer state, carries, traces, key).
      trace_bytes: the traces in it (all streams, all layers).
      peak_bytes: the estimated peak of a step, ``3 * state_bytes``.
      budget_bytes: ``train.max_memory`` (or the memory available), ``None`` for no limit.
    """

    state_bytes: int
    trace_bytes: int
    peak_bytes: int
    budget_bytes: int | None

    def describe(self) -> str:
        """One line: ``"memory: peak ~… (train state …, traces …); budget …"``."""
        budget = "no limit" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        return (
            f"memory: peak of a step ~{format_bytes(self.peak_bytes)} (train state"
            f" {format_bytes(self.state_bytes)}, traces {format_bytes(self.trace_bytes)}); budget {budget}"
        )


PEAK_STATES = 3
"""The peak of a step in train states: the one read, the one written, temporaries of about one."""


def memory_budget(max_memory: str | int) -> int | None:
    """The byte budget of ``train.max_memory``: a size (``8GiB``), ``""`` for the memory available
    (:func:`~rtrl_jax.available_memory`, ``None`` if unknown) or ``none`` for no limit."""
    if max_memory == "":
        return available_memory()
    if isinstance(max_memory, str) and max_memory.strip().lower() == "none":
        return None
    try:
        return parse_bytes(max_memory)
    except ValueError as error:
        raise ConfigError(
            f"train.max_memory: {error} Or '' (the memory available) or none (no limit)."
        ) from None


def _check_memory(
    spec: RunConfig, make_state: Any, core: Core | None = None, params: Any = None
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of the state ``make_state()`` would build; refuses one over budget.

    With ``core`` (and its abstract ``params``) the refusal names the estimators whose state fits.
    """
    abstract = jax.eval_shape(make_state)
    state_bytes = tree_bytes(abstract)
    traces = abstract.trace if hasattr(abstract, "trace") else _online_traces(abstract.online)
    traces = tree_bytes(traces)
    budget = memory_budget(spec.train.max_memory)
    estimate = MemoryEstimate(state_bytes, traces, PEAK_STATES * state_bytes, budget)
    if budget is None or estimate.peak_bytes <= budget:
        return estimate
    where = "train.max_memory" if spec.train.max_memory != "" else "the memory available (train.max_memory)"
    message = (
        f"train.max_memory: the run needs about {format_bytes(estimate.peak_bytes)} (peak of a step:"
        f" {PEAK_STATES} train states of {format_bytes(state_bytes)}, traces {format_bytes(traces)} of them)"
        f" but {where} is {format_bytes(budget)}."
    )
    if core is not None:
        stand_in = build_core(dataclasses.replace(spec.model, hidden=2), core.input_shape[-1])
        fitting = _fitting_estimators(
            core, stand_in, params, spec.train.batch_size, state_bytes - traces, budget
        )
        message += f" Estimators that would fit: {', '.join(fitting) or 'none'}."
    message += " Lower model.hidden or train.batch_size, or raise train.max_memory (none: no limit)."
    raise ConfigError(message)


def _online_traces(online: Any) -> Any:
    return [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(online)
        if any(getattr(entry, "key", None) == "trace" for entry in path)
    ]


def _abstract_trace(name: str, options: Any, core: Core, params: Any) -> Any:
    """The trace of estimator ``name`` on ``core``, built and initialised inside ``jax.eval_shape``
    (shapes only); raises when its construction needs concrete values (a probed sparsity pattern)."""
    carry = jax.eval_shape(lambda: core.initial_carry(jax.tree.leaves(params)[0].dtype))

    def init(p, c):
        return registry.make_estimator(name, core, **options).init(p, c, key=jax.random.PRNGKey(0))

    return jax.eval_shape(init, params, carry)


def _fitting_estimators(
    core: Core, stand_in: Core, params: Any, batch_size: int, other_bytes: int, budget: int
) -> list[str]:
    """The registered estimators (with their example options) whose run on ``core`` fits ``budget``.

    Each is built and sized inside ``jax.eval_shape``, so nothing is allocated. One whose
    construction needs concrete values (a probed sparsity pattern) cannot be sized and is left out;
    ``stand_in``, a small core of the same cell, tells which those are, so that none of them probes
    the large core (the probes allocate arrays of its parameters' size).
    """
    fitting = []
    for info in registry.registered():
        if info.unsupported_reason(core) is not None:
            continue
        try:
            _abstract_trace(info.name, info.example_options, stand_in, stand_in.params_spec)
        except Exception:  # noqa: BLE001 - an estimator that cannot be sized abstractly is not offered
            continue
        traces = batch_size * tree_bytes(_abstract_trace(info.name, info.example_options, core, params))
        peak = PEAK_STATES * (other_bytes + traces)
        if peak <= budget:
            fitting.append(f"{info.name} (~{format_bytes(peak)})")
    return fitting


class Experiment(NamedTuple):
    """Everything a :class:`RunConfig` describes, built.

    A spec whose model is one recurrent core and a linear readout (every whole-model key at its
    default) gets ``core``, ``estimator`` and ``head`` and an
    :class:`~rtrl_jax.OnlineTrainState`; any other gets ``model`` (an :class:`OnlineStack`),
    ``layers`` and a :class:`~rtrl_jax.ModelTrainState`, with ``core``, ``estimator`` and ``head``
    ``None``.

    Attributes:
      spec: the spec.
      task: the task.
      core: the core (cell ``spec.model.cell`` on the task's inputs), or ``None``.
      estimator: the estimator, or ``None``.
      optimizer: the Optax optimizer.
      head: the readout, or ``None``.
      data: the training streams, ``train.batch_size`` of ``train.steps`` steps, drawn chunk by
        chunk (:func:`~rtrl_jax.task_source`).
      state: the initial train state.
      model: the whole Flax model, or ``None``.
      layers: its recurrent layers, bottom first.
      memory: the :class:`MemoryEstimate` checked before the state was allocated.
    """

    spec: RunConfig
    task: Task
    core: Core | None
    estimator: Estimator | None
    optimizer: optax.GradientTransformation
    head: Head | None
    data: Source
    state: OnlineTrainState | ModelTrainState
    model: OnlineStack | None = None
    layers: tuple[Layer, ...] = ()
    memory: MemoryEstimate | None = None


class CompareJob(NamedTuple):
    """Everything a :class:`CompareConfig` describes, built.

    Attributes:
      spec: the spec.
      task: the task.
      core: the core.
      estimators: ``{label: estimator}`` in the spec's order.
      exact: the exact-RTRL shadow.
      params: the core's parameters.
      carry: its initial carry.
      head: the frozen readout.
      head_params: its parameters.
      stream: one stream of ``spec.steps`` steps, the shared trajectory.
      key: the key of the estimators' noise.
      dtype: the floating dtype.
    """

    spec: CompareConfig
    task: Task
    core: Core
    estimators: dict[str, Estimator]
    exact: Estimator
    params: Any
    carry: Any
    head: Head
    head_params: Any
    stream: Stream
    key: jax.Array
    dtype: Any


def _check_train(spec: RunConfig) -> None:
    train = spec.train
    check_name("train.optimizer", train.optimizer, OPTIMIZERS, "optimizer")
    check_name("train.nonfinite", train.nonfinite, NONFINITE_POLICIES, "policy")
    check_name("train.schedule", train.schedule, SCHEDULES, "schedule")
    if train.checkpoint_every % train.chunk_size:
        raise ConfigError(
            f"train.checkpoint_every: {train.checkpoint_every} is not a multiple of"
            f" train.chunk_size={train.chunk_size} (checkpoints are taken at chunk ends);"
            " allowed: 0 or a multiple of the chunk size."
        )


def _schedule(train: Any) -> dict[str, Any]:
    """``build_optimizer``'s schedule arguments for ``train``: the rate decays over the run's updates."""
    return {"schedule": train.schedule, "decay_steps": max(1, train.steps // train.update_every)}


def is_one_core(model: ModelConfig) -> bool:
    """Whether ``model`` is one recurrent core and a linear readout (every whole-model key at its default)."""
    return model == ModelConfig(
        cell=model.cell, hidden=model.hidden, dtype=model.dtype, feedback=model.feedback
    )


def _per_layer(model: ModelConfig, field: str, shared: Any, shared_key: str) -> list[tuple[Any, str]]:
    """``[(value, key)]`` per layer: the entries of ``model.<field>``, or ``shared`` for every layer."""
    values = getattr(model, field)
    if not values:
        return [(shared, shared_key)] * model.layers
    if len(values) != model.layers:
        raise ConfigError(
            f"model.{field}: expected {model.layers} entries, one per layer (model.layers={model.layers}),"
            f" got {len(values)}: {values!r}."
        )
    return [(value, f"model.{field}[{i}]") for i, value in enumerate(values)]


def _layer_options(spec: RunConfig, estimators: list[tuple[str, str]]) -> list[tuple[Any, str]]:
    if spec.model.layer_estimator_options:
        return _per_layer(spec.model, "layer_estimator_options", None, "")
    return [
        (spec.estimator_options if name == spec.estimator else {}, "estimator_options")
        for name, _ in estimators
    ]


def _make_cell(name: Any, hidden: Any, name_key: str, hidden_key: str) -> Any:
    """The linen cell ``name`` of ``hidden`` units (``*_key``: the spec keys, for messages)."""
    check_name(name_key, name, list(CELLS), "cell")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ConfigError(f"{hidden_key}: expected a positive integer, got {hidden!r}.")
    return CELLS[name](hidden)


def _online_layer(
    i: int, cell: Any, label: str, hidden: int, estimator: Any, options: Any, keys: tuple, input_size: int
) -> Layer:
    """The :class:`Layer` ``rnn<i>`` of ``cell``; its estimator is built (and cached) for it."""
    estimator_key, options_key = keys
    layer = f"rnn{i}"
    check_name(estimator_key, estimator, estimator_names(), "estimator")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"{options_key}: expected a mapping of options, got {options!r}.")
    options = dict(options or {})
    core = from_linen(cell, input_size, name=label)
    reason = registry.get_estimator_info(estimator).unsupported_reason(core)
    if reason is not None:
        message = registry.unsupported_message(estimator, core, reason)
        raise ConfigError(f"{estimator_key}: layer {i} ({layer}): {message}")
    try:
        online = linen_online_core(layer, cell, input_size, estimator, options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{options_key}: {error}") from None
    output_size = int(online.core.output_shape[-1])
    return Layer(label, hidden, estimator, options, input_size, output_size)


def _one_trace(spec: RunConfig, cells: list, labels: list[str], hidden: list[int], width: int) -> tuple:
    """The layers (and the norms between them) folded into ONE core with one trace: ``(cell, Layer)``."""
    model = spec.model
    for key in ("layer_estimators", "layer_estimator_options", "residual"):
        if getattr(model, key):
            raise ConfigError(
                f"model.{key}: {getattr(model, key)!r} needs model.traces=per_layer; with"
                " model.traces=stack the layers are one core with one trace of the run's estimator."
            )
    modules = []
    norm = names.NORMS[model.norm]
    for i, cell in enumerate(cells):
        if i and norm is not None:
            modules.append(norm())
        modules.append(cell)
    stacked = StackedCell(tuple(modules))
    label = f"stack({','.join(f'{n}/{h}' for n, h in zip(labels, hidden, strict=True))})"
    keys = ("estimator", "estimator_options")
    options = spec.estimator_options
    return stacked, _online_layer(0, stacked, label, sum(hidden), spec.estimator, options, keys, width)


def build_model(spec: RunConfig, input_size: int, num_outputs: int) -> tuple[OnlineStack, tuple[Layer, ...]]:
    """The whole Flax model of ``spec.model`` on inputs of ``input_size`` features.

    Every layer's cell is made and its estimator built for it (once: the layer reuses it). With
    ``model.traces=stack`` the layers and the norms between them are one
    :class:`~rtrl_jax.StackedCell` core with one trace (one :class:`Layer`).

    Returns:
      ``(model, layers)``: the :class:`OnlineStack` and its recurrent layers, bottom first.

    Raises:
      ConfigError: naming the key (``model.layer_estimators[1]``, ...) and, for a cell the chosen
        estimator cannot serve, the layer: a per-layer list of the wrong length, an unknown cell,
        estimator, head, norm or trace layout, bad options, a residual between layers of unequal
        widths, or per-layer estimators or residuals with ``model.traces=stack``.
    """
    model = spec.model
    check_name("model.head", model.head, names.HEADS, "head")
    check_name("model.feedback", model.feedback, FEEDBACK, "feedback")
    if model.feedback != "symmetric":
        raise ConfigError(
            f"model.feedback: {model.feedback!r} needs the one-core model (one layer, model.head=linear,"
            " every other whole-model key at its default); a whole model's readout sends the learning"
            " signal through its kernel. Allowed here: symmetric."
        )
    check_name("model.norm", model.norm, list(names.NORMS), "norm")
    check_name("model.traces", model.traces, names.TRACES, "trace layout")
    kinds = _per_layer(model, "layer_cells", model.cell, "model.cell")
    hidden = _per_layer(model, "layer_hidden", model.hidden, "model.hidden")
    cells = [_make_cell(n, h, n_key, h_key) for (n, n_key), (h, h_key) in zip(kinds, hidden, strict=True)]
    labels, sizes = [n for n, _ in kinds], [h for h, _ in hidden]
    width = model.embedding or input_size
    if model.traces == "stack":
        stacked, layer = _one_trace(spec, cells, labels, sizes, width)
        cells, layers = [stacked], [layer]
    else:
        estimators = _per_layer(model, "layer_estimators", spec.estimator, "estimator")
        options = _layer_options(spec, estimators)
        layers = []
        for i, ((estimator, e_key), (opts, o_key)) in enumerate(zip(estimators, options, strict=True)):
            keys = (e_key, o_key)
            layer = _online_layer(i, cells[i], labels[i], sizes[i], estimator, opts, keys, width)
            if model.residual and i > 0 and layer.output_size != width:
                raise ConfigError(
                    f"model.residual: layer {i} (rnn{i}) maps {width} features to {layer.output_size};"
                    " a residual needs equal widths. Allowed: layers of equal widths"
                    " (model.layer_hidden) or model.residual=false."
                )
            layers.append(layer)
            width = layer.output_size
    width = layers[-1].output_size
    stack = OnlineStack(
        cells=tuple(cells),
        estimators=tuple(layer.estimator for layer in layers),
        options=tuple(FrozenDict(layer.options) for layer in layers),
        num_outputs=num_outputs,
        embedding=model.embedding,
        head_hidden=(model.head_hidden or width) if model.head == "mlp" else 0,
        residual=model.residual,
        norm=model.norm,
    )
    return stack, tuple(layers)


def _build_model_run(spec: RunConfig, task: Task, dtype: Any) -> Experiment:
    model, layers = build_model(spec, task.input_size, task.num_classes)
    train = spec.train
    optimizer = build_optimizer(
        train.optimizer, train.learning_rate, **_schedule(train), update_every=train.update_every
    )
    key_model, _, key_data, key_state = jax.random.split(jax.random.PRNGKey(train.seed), 4)
    x0 = jnp.zeros((train.batch_size, task.input_size), jnp.float32)

    def make_state():
        variables = model.init(key_model, x0, jnp.zeros((train.batch_size,), bool))
        variables = cast_floating(variables, dtype)
        return init_model_train_state(optimizer, variables, batch_size=train.batch_size, key=key_state)

    memory = _check_memory(spec, make_state)
    state = make_state()
    data = _task_source(task, key_data, train)
    return Experiment(spec, task, None, None, optimizer, None, data, state, model, layers, memory)


def _task_source(task: Task, key: jax.Array, train: Any) -> Source:
    """The run's streams of ``task``, drawn chunk by chunk (memory independent of ``train.steps``).

    A task without a ``window`` is sampled whole (memory grows with ``train.steps``).
    """
    if task.window is not None:
        return task_source(task, key, train.batch_size, train.steps)
    stream = sample_batch(task, key, train.steps, train.batch_size)
    chunk = lambda start, length: jax.tree.map(lambda a: a[:, start : start + length], stream)  # noqa: E731
    return Source(chunk, train.batch_size, train.steps)


def _build_run(spec: RunConfig) -> Experiment:
    check_name("estimator", spec.estimator, estimator_names(), "estimator")
    dtype = enable_dtype(spec.model.dtype)
    _check_train(spec)
    spec = dataclasses.replace(spec, task_options=absolute_paths(spec.task_options))
    task = build_task(spec.task, spec.task_options)
    if not is_one_core(spec.model):
        return _build_model_run(spec, task, dtype)
    core = build_core(spec.model, task.input_size)
    estimator = build_estimator(spec.estimator, spec.estimator_options, core)
    train = spec.train
    optimizer = build_optimizer(
        train.optimizer,
        train.learning_rate,
        **_schedule(train),
        update_every=train.update_every,
        feedback=spec.model.feedback,
    )
    key_core, key_head, key_data, key_state = jax.random.split(jax.random.PRNGKey(train.seed), 4)
    head = build_head(spec.model.feedback)

    def make_state():
        core_params, _ = core.init(key_core, dtype)
        head_params = head.init(key_head, core.output_shape[-1], task.num_classes, dtype)
        return init_train_state(
            core, estimator, optimizer, core_params, head_params, batch_size=train.batch_size, key=key_state
        )

    params = jax.eval_shape(lambda: core.init(key_core, dtype)[0])
    memory = _check_memory(spec, make_state, core, params)
    state = make_state()
    data = _task_source(task, key_data, train)
    return Experiment(spec, task, core, estimator, optimizer, head, data, state, memory=memory)


def _build_compare(spec: CompareConfig) -> CompareJob:
    dtype = enable_dtype(spec.model.dtype)
    task = build_task(spec.task, spec.task_options)
    core = build_core(spec.model, task.input_size)
    estimators = {}
    for label, options in spec.estimators.items():
        key = f"estimators.{label}"
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{key}: expected a mapping of options, got {options!r}.")
        options = dict(options or {})
        name = options.pop("estimator", label)
        estimators[label] = build_estimator(name, options, core, key=key, options_key=key)
    key_core, key_head, key_data, key_run = jax.random.split(jax.random.PRNGKey(spec.seed), 4)
    params, carry = core.init(key_core, dtype)
    head, head_params = init_head(key_head, core, task.num_classes, dtype, spec.model.feedback)
    stream = task.sample(key_data, spec.steps)
    return CompareJob(
        spec, task, core, estimators, rtrl(core), params, carry, head, head_params, stream, key_run, dtype
    )


@overload
def build(spec: RunConfig) -> Experiment: ...


@overload
def build(spec: CompareConfig) -> CompareJob: ...


def build(spec: RunConfig | CompareConfig) -> Experiment | CompareJob:
    """Builds everything ``spec`` describes, once, checking it on the way.

    Args:
      spec: a :class:`RunConfig` (``rtrl-jax train``) or a :class:`CompareConfig`
        (``rtrl-jax compare``), e.g. from :func:`~rtrl_jax.experiment.load_config`.

    Returns:
      An :class:`Experiment` for a run config, a :class:`CompareJob` for a comparison.

    Raises:
      ConfigError: for an unknown estimator, task, cell, dtype, optimizer or non-finite policy,
        task or estimator options that their factories refuse, an estimator that cannot serve the
        cell (naming those that can, and the layer of a whole model), a whole model's bad layer
        lists, head, norm or residual (:func:`build_model`), or a ``train.checkpoint_every`` that
        is not a multiple of ``train.chunk_size``.
    """
    if isinstance(spec, RunConfig):
        return _build_run(spec)
    if isinstance(spec, CompareConfig):
        return _build_compare(spec)
    raise TypeError(f"build takes a RunConfig or a CompareConfig, got {type(spec).__name__}.")
