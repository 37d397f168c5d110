"""A training run of an :class:`~rtrl_jax.experiment.Experiment`: train it and write its run folder.

The run folder holds

- ``config.yaml``: the resolved spec;
- ``metrics.jsonl`` and ``metrics.csv``: one row per step: step, loss, accuracy (``null`` for a
  task whose targets are soft, e.g. the add task), grad_norm, weight (the summed loss weights)
  and nonfinite (0, or the bit flags of the non-finite quantities);
- ``checkpoints/``: Orbax checkpoints of the whole run state every ``train.checkpoint_every`` steps,
  on interrupt (SIGINT / SIGTERM) and at the end; ``run_training(..., resume=True)`` (the CLI's
  ``--resume RUN_DIR``) continues from the newest good one, bitwise as if never stopped;
- ``summary.json``: status, initial and final loss, accuracy where it applies, non-finite events,
  steps/s, estimator, cell, task (and a whole model's layers), device, versions.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from rtrl_jax._src import registry
from rtrl_jax._src.base import tree_size
from rtrl_jax._src.trainer import (
    NonFiniteError,
    OnlineTrainState,
    StepMetrics,
    nonfinite_names,
    train_model_online,
    train_online,
)
from rtrl_jax.experiment.build import Experiment, build
from rtrl_jax.experiment.checkpoint import Checkpointer
from rtrl_jax.experiment.spec import RunConfig, load_config, to_dict


class RunError(RuntimeError):
    """A run folder that cannot be used as asked (e.g. a fresh run into a folder with checkpoints)."""


def _window_mean(values: jax.Array | np.ndarray, weights: jax.Array | np.ndarray) -> float | None:
    total = float(np.sum(weights))
    return float(np.sum(values) / total) if total > 0 else None


def summarize(metrics: StepMetrics, *, hard_targets: bool) -> dict[str, Any]:
    """Initial and final loss (and accuracy) over the first and last tenth of the steps."""
    steps = metrics.loss.shape[0]
    tenth = max(1, steps // 10)
    head, tail = slice(0, tenth), slice(steps - tenth, steps)
    summary = {
        "initial_loss": _window_mean(metrics.loss[head], metrics.weight[head]),
        "final_loss": _window_mean(metrics.loss[tail], metrics.weight[tail]),
    }
    if hard_targets:
        summary["final_accuracy"] = _window_mean(metrics.correct[tail], metrics.weight[tail])
    return summary


METRIC_COLUMNS = ("step", "loss", "accuracy", "grad_norm", "weight", "nonfinite")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def metric_rows(metrics: StepMetrics, first_step: int, *, hard_targets: bool = True) -> list[dict[str, Any]]:
    """One dict per step (``METRIC_COLUMNS``); means over the batch, ``None`` where undefined (the
    accuracy of a task whose targets are soft, ``hard_targets=False``, is ``None`` throughout)."""
    rows = []
    for i in range(metrics.loss.shape[0]):
        weight = float(metrics.weight[i])
        rows.append(
            {
                "step": first_step + i + 1,
                "loss": _finite_or_none(float(metrics.loss[i]) / weight) if weight > 0 else None,
                "accuracy": float(metrics.correct[i]) / weight if hard_targets and weight > 0 else None,
                "grad_norm": _finite_or_none(float(metrics.grad_norm[i])),
                "weight": weight,
                "nonfinite": int(metrics.nonfinite[i]),
            }
        )
    return rows


def write_metrics(out_dir: Path, rows: list[dict[str, Any]], *, fresh: bool = False) -> None:
    """Appends ``rows`` to ``metrics.jsonl`` and ``metrics.csv`` in ``out_dir`` (``fresh``: rewrite)."""
    mode = "w" if fresh else "a"
    with (out_dir / "metrics.jsonl").open(mode) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    csv_path = out_dir / "metrics.csv"
    new_csv = fresh or not csv_path.exists()
    with csv_path.open(mode if not new_csv else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        if new_csv:
            writer.writeheader()
        writer.writerows(rows)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` in a run folder (a cut-off last line is dropped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def rows_to_metrics(rows: list[dict[str, Any]]) -> StepMetrics:
    """Summed :class:`StepMetrics` back from metric rows (for summaries over a resumed run)."""

    def column(name, scale):
        return np.array(
            [(r[name] if r[name] is not None else 0.0) * (r["weight"] if scale else 1.0) for r in rows],
            np.float64,
        )

    return StepMetrics(
        loss=column("loss", True),
        weight=column("weight", False),
        correct=column("accuracy", True),
        grad_norm=column("grad_norm", False),
        nonfinite=np.array([r["nonfinite"] for r in rows], np.int32),
    )


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _SignalCatcher:
    """Turns SIGINT / SIGTERM into a flag read at chunk ends (a second signal acts at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def run_training(
    experiment: Experiment | RunConfig,
    out_dir: str | Path,
    *,
    on_chunk: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Trains ``experiment`` online and writes its run folder.

    SIGINT and SIGTERM are caught: the run stops at the end of the current chunk, saves a
    checkpoint and returns a summary with ``status: "interrupted"``.

    Args:
      experiment: a built :class:`Experiment`, or a :class:`RunConfig` to build.
      out_dir: the run folder (created).
      on_chunk: ``(steps_done, {"loss": ..., "steps_per_s": ..., "nonfinite": ...})`` after each
        chunk (progress bars); ``steps_per_s`` is the rate since the end of the first chunk (NaN
        at the first chunk, whose time includes compiling).
      on_start: ``(step)`` once before training, with the step it starts from (the restored
        checkpoint's on ``resume``, else 0).
      resume: continue the run in ``out_dir`` from its newest good checkpoint (from the start if it
        has none); the spec must be the run's (``load_config(out_dir / "config.yaml")``).

    Returns:
      The summary (also written to ``summary.json``), with ``status`` one of ``finished``,
      ``interrupted`` or ``stopped_nonfinite``.

    Raises:
      RunError: ``out_dir`` is a file, a fresh run into a folder that already holds checkpoints, or
        ``resume`` of a finished run whose last checkpoint is good (its summary is kept).
      ConfigError: a :class:`RunConfig` that does not build.
    """
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"run folder {str(out_dir)!r} is a file, not a folder; choose another --out.")
    if not resume and checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        raise RunError(
            f"run folder {str(out_dir)!r} already holds checkpoints; continue it with"
            f" `rtrl-jax train --resume {out_dir}` or choose another --out."
        )
    if not isinstance(experiment, Experiment):
        experiment = build(experiment)
    config, state = experiment.spec, experiment.state
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    checkpointer = Checkpointer(checkpoint_dir, keep=config.train.keep_checkpoints)
    resumed_from = None
    if resume:
        restored = checkpointer.restore_latest(like=state)
        if restored is not None:
            state, resumed_from = restored, int(restored.step)
    start = int(state.step)
    if resume and start >= config.train.steps:
        checkpointer.close()
        _check_unfinished(out_dir)
    earlier = [row for row in read_metrics(out_dir) if row["step"] <= start]
    write_metrics(out_dir, earlier, fresh=True)
    if on_start is not None:
        on_start(start)

    timing: dict[str, Any] = {
        "start": time.perf_counter(),
        "first_chunk_end": None,
        "first_chunk_steps": start,
    }
    timing["rate"] = math.nan
    every = config.train.checkpoint_every

    latest = {"state": state}

    def callback(state: OnlineTrainState, metrics: StepMetrics) -> None:
        latest["state"] = state
        steps_done = int(state.step)
        first = steps_done - metrics.loss.shape[0]
        write_metrics(out_dir, metric_rows(metrics, first, hard_targets=experiment.task.hard_targets))
        now = time.perf_counter()
        first_chunk = timing["first_chunk_end"] is None
        if first_chunk:
            timing["first_chunk_end"], timing["first_chunk_steps"] = now, steps_done
            timing["rate"] = (steps_done - start) / (now - timing["start"])
        elif steps_done > timing["first_chunk_steps"]:
            timing["rate"] = (steps_done - timing["first_chunk_steps"]) / (now - timing["first_chunk_end"])
        if on_chunk is not None:
            loss = _window_mean(metrics.loss, metrics.weight)
            on_chunk(
                steps_done,
                {
                    "loss": math.nan if loss is None else loss,
                    "steps_per_s": math.nan if first_chunk else timing["rate"],
                    "nonfinite": int(np.count_nonzero(metrics.nonfinite)),
                },
            )
        if catcher.signum is not None:
            checkpointer.save(state)
            raise _Interrupted(catcher.signum)
        if every and steps_done % every == 0 and steps_done < config.train.steps:
            checkpointer.save(state)

    status = "finished"
    event: dict[str, Any] | None = None
    try:
        with _SignalCatcher() as catcher:
            if start < config.train.steps:
                state, _ = train(
                    experiment,
                    state,
                    chunk_size=config.train.chunk_size,
                    callback=callback,
                    nonfinite=config.train.nonfinite,
                    keep_metrics=False,
                )
            checkpointer.save(state)
    except _Interrupted as interrupt:
        status, state = "interrupted", latest["state"]
        event = {"signal": signal.Signals(interrupt.signum).name}
    except NonFiniteError as error:
        status, state = "stopped_nonfinite", error.state
        event = {"step": error.step, "quantities": error.quantities, "message": str(error)}
        checkpointer.save(state)
    finally:
        checkpointer.close()

    rows = read_metrics(out_dir)
    wall_s = time.perf_counter() - timing["start"]
    summary = {"status": status, **_run_summary(experiment, rows, int(state.step), resumed_from)}
    summary.update(steps_per_s=_finite_or_none(timing["rate"]), wall_s=wall_s, **_describe(experiment))
    if status == "interrupted":
        summary["interrupt"] = event
    elif status == "stopped_nonfinite":
        summary["stop"] = event
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_unfinished(out_dir: Path) -> None:
    """Refuses to resume a run at its end whose ``summary.json`` says it finished."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(summary, dict) and summary.get("status") == "finished":
        raise RunError(
            f"run {str(out_dir)!r} is finished ({summary.get('steps')} steps); there is nothing to"
            " resume and its summary is kept. Start a new run with --out, or a longer one from its"
            " config.yaml with train.steps=..."
        )


def train(experiment: Experiment, state: Any, **options: Any) -> tuple[Any, StepMetrics]:
    """Trains ``experiment`` from ``state`` over its data: its core and head
    (:func:`~rtrl_jax.train_online`) or its whole model (:func:`~rtrl_jax.train_model_online`).

    Args:
      experiment: a built :class:`Experiment`.
      state: its train state (``experiment.state`` or a restored one).
      **options: ``chunk_size``, ``callback``, ``nonfinite``, ``keep_metrics`` of the trainer.

    Returns:
      ``(final state, per-step metrics)``.
    """
    if experiment.model is not None:
        return train_model_online(experiment.model, experiment.optimizer, experiment.data, state, **options)
    core, estimator, optimizer = experiment.core, experiment.estimator, experiment.optimizer
    assert core is not None and estimator is not None  # a run without a model has both
    return train_online(core, estimator, optimizer, experiment.data, state, head=experiment.head, **options)


def _run_summary(
    experiment: Experiment, rows: list[dict[str, Any]], steps: int, resumed_from: int | None
) -> dict[str, Any]:
    """Losses, accuracy and non-finite events of a run, read off its metric rows."""
    bad = [row for row in rows if row["nonfinite"]]
    return {
        **summarize(rows_to_metrics(rows), hard_targets=experiment.task.hard_targets),
        "steps": steps,
        "resumed_from": resumed_from,
        "nonfinite_steps": len(bad),
        "nonfinite_events": [
            {"step": row["step"], "quantities": nonfinite_names(row["nonfinite"])} for row in bad[:20]
        ],
    }


VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "rtrl_jax")
"""The packages whose versions a summary records."""


def versions() -> dict[str, str | None]:
    """The installed versions of :data:`VERSIONED` (``None`` for one not installed)."""
    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def used_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options estimator ``name`` ran with: ``options`` over the registry's defaults."""
    defaults = registry.estimator_options(name)
    used = {key: value for key, value in defaults.items() if value is not registry.REQUIRED}
    return _plain({**used, **options})


def _plain(value: Any) -> Any:
    """``value`` as JSON data (tuples as lists, anything else unknown as its ``repr``)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _describe(experiment: Experiment) -> dict[str, Any]:
    """What ran where: estimator and the options it used, cell, task, device, versions."""
    spec = experiment.spec
    device = jax.devices()[0]
    described = {
        "estimator": spec.estimator,
        "estimator_options": used_options(spec.estimator, spec.estimator_options),
        "cell": spec.model.cell,
        "hidden": spec.model.hidden,
    }
    if experiment.model is None:
        assert experiment.core is not None  # a run without a model has one core
        described["num_params"] = experiment.core.num_params
    else:  # the recurrent layers' parameters, then every layer as built
        params = experiment.state.params
        described["num_params"] = sum(tree_size(params[f"rnn{i}"]) for i in range(len(experiment.layers)))
        described["layers"] = [
            {**layer._asdict(), "options": used_options(layer.estimator, layer.options)}
            for layer in experiment.layers
        ]
    return {
        **described,
        "task": experiment.task.name,
        "device": f"{device.platform}:{device.device_kind}",
        "jax_version": jax.__version__,
        "versions": versions(),
    }


def restore_final_state(run_dir: str | Path) -> OnlineTrainState | None:
    """The newest good checkpointed state of a run folder (built from its ``config.yaml``)."""
    run_dir = Path(run_dir)
    experiment = build(load_config(run_dir / "config.yaml"))
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=experiment.spec.train.keep_checkpoints)
    try:
        return checkpointer.restore_latest(like=experiment.state)
    finally:
        checkpointer.close()
