"""Spiking learning benchmark: `python benchmarks/spiking.py configs/bench_evidence.yaml [k=v ...]`.

Recurrent networks of LIF and ALIF neurons (:class:`rtrl_jax.LIFCell`, :class:`rtrl_jax.ALIFCell`)
learn the evidence-accumulation task of Bellec et al. 2020 (:func:`rtrl_jax.evidence_task`) online,
every step an Optax update, with each estimator of the config: e-prop with symmetric, random or
adaptive feedback (per-estimator key ``feedback``, the values of ``model.feedback``:
:func:`rtrl_jax.experiment.build.build_head`), RFLO, SnAp-1, and BPTT over the whole trial
(``tbptt`` with a window of the episode's length; the trainer resets its trace at every episode
start, so each step's window reaches back to the trial's first step).

Reported per cell and estimator: the recall-step cross-entropy and accuracy over the last tenth of
the training episodes (online: each episode is new data, scored before the updates it causes), mean
and spread over seeds. Writes ``evidence.json`` and ``evidence.md`` (the table) into DIR (default
``benchmarks/results/evidence/``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from rtrl_jax._src import spiking, tasks
from rtrl_jax._src.cores import from_linen
from rtrl_jax._src.trainer import init_train_state, make_train_chunk
from rtrl_jax.experiment import ConfigError, build_estimator, build_optimizer, enable_dtype, read_yaml
from rtrl_jax.experiment.build import FEEDBACK, build_head, check_name

CELLS = {"lif": spiking.LIFCell, "alif": spiking.ALIFCell}

DEFAULTS = {
    "cells": ["lif", "alif"],
    "hidden": 32,
    "cell_options": {"self_connections": False},
    "alif_options": {"tau_adaptation": 100.0, "beta": 1.0},
    "task_options": {},
    "dtype": "float32",
    "optimizer": "adam",
    "learning_rates": [0.005, 0.001],
    "clip": 1.0,
    "batch_size": 16,
    "episodes": 200,
    "chunk_episodes": 20,
    "seeds": 2,
    "estimators": [{"estimator": "eprop"}, {"estimator": "tbptt", "window": "episode"}],
}

_SPEC_KEYS = ("estimator", "feedback", "learning_rate")  # per-estimator keys that are not options


def load_config(path: str, overrides: list[str]) -> dict:
    """The config file with dotted ``key=value`` overrides, its defaults filled in."""
    data = read_yaml(path, overrides)
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; allowed: {', '.join(DEFAULTS)}.")
    cfg = {**DEFAULTS, **data}
    for cell in cfg["cells"]:
        if cell not in CELLS:
            raise ConfigError(f"cells: {cell!r} is not one of {', '.join(CELLS)}.")
    for spec in cfg["estimators"]:
        if not isinstance(spec, dict) or "estimator" not in spec:
            raise ConfigError(f"estimators: each entry needs an 'estimator:' name, got {spec!r}.")
        check_name(
            f"estimators: {label(spec)}: feedback", spec.get("feedback", "symmetric"), FEEDBACK, "feedback"
        )
    return cfg


def label(spec: dict) -> str:
    """``eprop``, ``eprop feedback=random``, ``tbptt window=episode``, ..."""
    extras = {k: v for k, v in spec.items() if k != "estimator"}
    return spec["estimator"] + "".join(f" {k}={v}" for k, v in extras.items())


def _episode(task_options: dict) -> int:
    """Steps per episode of ``evidence_task(**task_options)`` (between the first two resets)."""
    return _episode_of(json.dumps(task_options, sort_keys=True))


@functools.cache
def _episode_of(task_options: str) -> int:
    task = tasks.evidence_task(**json.loads(task_options))
    reset = jax.jit(lambda key: task.sample(key, 10_000).reset)(jax.random.PRNGKey(0))
    starts = np.flatnonzero(np.asarray(reset))
    return int(starts[1] - starts[0])


class Setup(NamedTuple):
    """What the runs of one cell and estimator share (so that seeds reuse the compiled chunk)."""

    task: tasks.Task
    episode: int
    core: Any
    estimator: Any
    feedback: str
    head: Any


def setup(cfg: dict, cell_name: str, spec: dict) -> Setup:
    """The task, core, estimator and head of one cell and estimator entry."""
    task = tasks.evidence_task(**cfg["task_options"])
    episode = _episode(cfg["task_options"])
    options = dict(cfg["cell_options"], **(cfg["alif_options"] if cell_name == "alif" else {}))
    core = from_linen(CELLS[cell_name](cfg["hidden"], **options), task.input_size, name=cell_name)
    estimator_options = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    if estimator_options.get("window") == "episode":
        estimator_options["window"] = episode
    estimator = build_estimator(spec["estimator"], estimator_options, core, key=label(spec))
    feedback = spec.get("feedback", "symmetric")
    head = build_head(feedback, key=f"{label(spec)}: feedback")
    return Setup(task, episode, core, estimator, feedback, head)


def train(cfg: dict, run: Setup, learning_rate: float, seed: int) -> dict:
    """One online run: per-episode recall loss and accuracy (means over the batch) and its seconds."""
    dtype = enable_dtype(cfg["dtype"], key="dtype")
    optimizer = build_optimizer(
        cfg["optimizer"], learning_rate, clip=cfg["clip"], feedback=run.feedback, key="optimizer"
    )
    key_core, key_head, key_state, key_data = jax.random.split(jax.random.PRNGKey(seed), 4)
    core_params, _ = run.core.init(key_core, dtype)
    head_params = run.head.init(key_head, run.core.output_shape[-1], run.task.num_classes, dtype)
    state = init_train_state(
        run.core,
        run.estimator,
        optimizer,
        core_params,
        head_params,
        batch_size=cfg["batch_size"],
        key=key_state,
    )
    chunk = make_train_chunk(run.core, run.estimator, optimizer, head=run.head)
    source = tasks.task_source(run.task, key_data, cfg["batch_size"])
    steps = cfg["chunk_episodes"] * run.episode
    losses, accuracies = [], []
    start = time.perf_counter()
    for begin in range(0, cfg["episodes"] * run.episode, steps):
        data = source.chunk(begin, steps)
        data = data._replace(inputs=data.inputs.astype(dtype), targets=data.targets.astype(dtype))
        state, metrics = chunk(state, data)
        per_episode = lambda m: np.asarray(m).reshape(-1, run.episode).sum(axis=1)  # noqa: E731
        weight = per_episode(metrics.weight)
        losses.append(per_episode(metrics.loss) / weight)
        accuracies.append(per_episode(metrics.correct) / weight)
    loss, accuracy = np.concatenate(losses), np.concatenate(accuracies)
    tail = max(1, loss.shape[0] // 10)
    return {
        "final_loss": float(np.mean(loss[-tail:])),
        "final_accuracy": float(np.mean(accuracy[-tail:])),
        "wall_s": time.perf_counter() - start,
        "loss_curve": [float(x) for x in loss],
        "accuracy_curve": [float(x) for x in accuracy],
    }


def run(cfg: dict) -> tuple[dict, dict]:
    """Every cell × estimator × learning rate × seed.

    Each estimator without its own ``learning_rate`` runs at every rate of ``learning_rates`` and
    is reported at the rate with the lowest mean final loss over the seeds (the same seeds: a small,
    optimistic sweep, equal for all estimators).

    Returns:
      ``({cell: {label: {learning_rate, final_loss: [...], ...}}}, {cell: {label: {rate: mean final
      loss}}})``.
    """
    results, sweep = {}, {}
    for cell_name in cfg["cells"]:
        for spec in cfg["estimators"]:
            shared = setup(cfg, cell_name, spec)
            rates = [spec["learning_rate"]] if "learning_rate" in spec else cfg["learning_rates"]
            best = None
            for rate in rates:
                entry = {"learning_rate": rate}
                for seed in range(cfg["seeds"]):
                    for name, value in train(cfg, shared, rate, seed).items():
                        entry.setdefault(name, []).append(value)
                mean = float(np.mean(entry["final_loss"]))
                sweep.setdefault(cell_name, {}).setdefault(label(spec), {})[str(rate)] = mean
                if best is None or mean < np.mean(best["final_loss"]):
                    best = entry
            results.setdefault(cell_name, {})[label(spec)] = best
    return results, sweep


def table(document: dict) -> str:
    """The markdown table of a result document."""
    cfg = document["config"]
    lines = [
        f"Evidence accumulation ({document['task']}, {document['episode_steps']} steps per episode),"
        f" {cfg['hidden']} neurons, batch {cfg['batch_size']}, {cfg['episodes']} episodes,"
        f" {cfg['optimizer']}, {cfg['seeds']} seeds;"
        f" {document['device']}, jax {document['jax_version']}. Recall steps of the last tenth of the"
        " episodes; chance: loss 0.693, accuracy 0.5; the last cue alone: accuracy"
        f" {document['last_cue_accuracy']:.2f}.\n\n"
        "| cell | estimator | learning rate | accuracy (mean ± sd) | loss (mean ± sd) | s/run"
        " | loss at each rate |\n|---|---|---|---|---|---|---|\n"
    ]
    for cell_name, rows in document["results"].items():
        for name, r in rows.items():
            accuracy, loss = r["final_accuracy"], r["final_loss"]
            rates = ", ".join(f"{k}: {v:.3f}" for k, v in document["sweep"][cell_name][name].items())
            lines.append(
                f"| {cell_name} | {name} | {r['learning_rate']}"
                f" | {np.mean(accuracy):.3f} ± {np.std(accuracy):.3f}"
                f" | {np.mean(loss):.3f} ± {np.std(loss):.3f} | {np.mean(r['wall_s']):.0f} | {rates} |\n"
            )
    return "".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a configs/bench_evidence.yaml file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "evidence"))
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        start = time.perf_counter()
        results, sweep = run(cfg)
    except ConfigError as error:
        print(f"spiking.py: invalid configuration: {error}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    document = {
        "config": cfg,
        "task": tasks.evidence_task(**cfg["task_options"]).name,
        "episode_steps": _episode(cfg["task_options"]),
        "last_cue_accuracy": last_cue_accuracy(cfg["task_options"].get("num_cues", 3)),
        "device": f"{device.platform}:{device.device_kind}",
        "jax_version": jax.__version__,
        "wall_s": time.perf_counter() - start,
        "results": results,
        "sweep": sweep,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps(document, indent=1) + "\n")
    (out / "evidence.md").write_text(table(document))
    print(table(document))
    print(f"{document['wall_s']:.0f} s; wrote {out}/evidence.json, .md")
    return 0


def last_cue_accuracy(num_cues: int) -> float:
    """P(the last cue's side has the majority) for ``num_cues`` fair cues (odd):
    ``½ + C(n−1, (n−1)/2) / 2ⁿ``."""
    others = num_cues - 1
    return 0.5 + math.comb(others, others // 2) / 2.0**num_cues


if __name__ == "__main__":
    sys.exit(main())
