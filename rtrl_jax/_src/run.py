"""A training run from a :class:`~rtrl_jax._src.config.RunConfig`: build, train, write the run folder.

The run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per
step: step, loss, accuracy, grad_norm) and ``summary.json`` (initial and final loss, accuracy where
it applies, steps/s, estimator, cell, task, device, versions).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from rtrl_jax._src import models, tasks
from rtrl_jax._src.config import RunConfig, to_dict
from rtrl_jax._src.registry import make_estimator
from rtrl_jax._src.trainer import (
    OnlineTrainState,
    StepMetrics,
    init_train_state,
    linear_head,
    train_online,
)


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """The Optax optimizer of ``config.train`` (wrapped in ``MultiSteps`` when ``update_every > 1``)."""
    optimizer = getattr(optax, config.train.optimizer)(config.train.learning_rate)
    if config.train.update_every > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.train.update_every)
    return optimizer


def _window_mean(values: np.ndarray, weights: np.ndarray) -> float | None:
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


def write_metrics(path: Path, metrics: StepMetrics, first_step: int) -> None:
    """Appends one JSON line per step to ``path``."""
    with path.open("a") as f:
        for i in range(metrics.loss.shape[0]):
            weight = float(metrics.weight[i])
            row = {
                "step": first_step + i + 1,
                "loss": float(metrics.loss[i]) / weight if weight > 0 else None,
                "accuracy": float(metrics.correct[i]) / weight if weight > 0 else None,
                "grad_norm": float(metrics.grad_norm[i]),
            }
            f.write(json.dumps(row) + "\n")


def run_training(
    config: RunConfig,
    out_dir: str | Path,
    *,
    on_chunk: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Runs the online training job of ``config`` and writes its run folder.

    Args:
      config: a validated config.
      out_dir: the run folder (created).
      on_chunk: ``(steps_done, {"loss": ..., "steps_per_s": ...})`` after each chunk (progress bars).

    Returns:
      The summary (also written to ``summary.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")

    dtype = jnp.dtype(config.model.dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    task = tasks.TASKS[config.task](**config.task_options)
    core = models.build_core(config, task.input_size)
    estimator = make_estimator(config.estimator, core, **config.estimator_options)
    optimizer = make_optimizer(config)
    key = jax.random.PRNGKey(config.train.seed)
    key_core, key_head, key_data, key_state = jax.random.split(key, 4)
    core_params, _ = core.init(key_core, dtype)
    head = linear_head()
    head_params = head.init(key_head, core.output_shape[-1], task.num_classes, dtype)
    stream = tasks.sample_batch(task, key_data, config.train.steps, config.train.batch_size)
    state = init_train_state(
        core,
        estimator,
        optimizer,
        core_params,
        head_params,
        batch_size=config.train.batch_size,
        key=key_state,
    )

    timing = {"start": time.perf_counter(), "first_chunk_end": None, "first_chunk_steps": 0}

    def callback(state: OnlineTrainState, metrics: StepMetrics) -> None:
        steps_done = int(state.step)
        write_metrics(metrics_path, metrics, steps_done - metrics.loss.shape[0])
        now = time.perf_counter()
        if timing["first_chunk_end"] is None:
            timing["first_chunk_end"], timing["first_chunk_steps"] = now, steps_done
            rate = steps_done / (now - timing["start"])
        else:
            rate = (steps_done - timing["first_chunk_steps"]) / (now - timing["first_chunk_end"])
        timing["rate"] = rate
        if on_chunk is not None:
            loss = _window_mean(metrics.loss, metrics.weight)
            on_chunk(steps_done, {"loss": math.nan if loss is None else loss, "steps_per_s": rate})

    state, metrics = train_online(
        core,
        estimator,
        optimizer,
        stream,
        state,
        head=head,
        chunk_size=config.train.chunk_size,
        callback=callback,
    )
    device = jax.devices()[0]
    summary = {
        **summarize(metrics, hard_targets=task.hard_targets),
        "steps": int(state.step),
        "steps_per_s": timing["rate"],
        "wall_s": time.perf_counter() - timing["start"],
        "estimator": config.estimator,
        "estimator_options": config.estimator_options,
        "cell": config.model.cell,
        "hidden": config.model.hidden,
        "num_params": core.num_params,
        "task": task.name,
        "device": f"{device.platform}:{device.device_kind}",
        "jax_version": jax.__version__,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
