"""Learning benchmarks: `python benchmarks/learning.py configs/bench_<name>.yaml [key=value ...] [--out DIR]`.

Each estimator is trained online on a task; the results go to `<name>.json`, `<name>.md` (the
table) and `<name>.png` (learning curves) in DIR (default `benchmarks/results/`). One YAML config
per benchmark (``configs/bench_*.yaml``, key ``benchmark:`` names it); the cores, estimators,
optimizers and readouts come from the experiment layer's build pieces (:mod:`rtrl_jax.experiment`):

- ``influence_balancing`` (Tallec & Ollivier 2017, arXiv:1702.05043): the linear chain
  ``s_{t+1} = A s_t + θ v``, ``A = ½I + ½·(superdiagonal ones)``, ``v`` = ``num_plus`` +1 entries then
  −1 entries, scalar ``θ``, loss ``½(s¹_t − 1)²``. The short-term influence of ``θ`` on ``s¹`` is
  positive but the long-term one is negative, so truncations shorter than the balance point push
  ``θ`` the wrong way and diverge, while exact RTRL and UORO (unbiased) converge.
- ``add`` (Marschall, Cho & Savin 2020): a tanh RNN, online SGD with batch 1; the final loss of every
  estimator against the task's baselines.
- ``copy_curriculum``: the copy task whose length grows by one whenever the mean recall loss over a
  check interval falls below a threshold (every pattern at the current length, or each episode's
  length drawn uniformly up to it); the length reached in a fixed step budget and the steps to a
  target length, over seeds (a run may end at the target).
- ``char_lm``: character-level language modelling of a text file (a contiguous tail held out);
  validation bits per character, learning curves against characters seen.

A config may carry several scales (``scales: {cpu: ..., paper: ...}``, chosen with ``scale=NAME``;
``cpu`` by default): ``cpu`` is sized for a 2-core machine, ``paper`` follows the papers' sizes and
budgets for an accelerator. Every table reports the benchmark's own speed (training steps per
second, each a step of every stream of the batch, compilation excluded) and seconds per run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rtrl_jax._src import tasks
from rtrl_jax._src.cores import Core, from_function
from rtrl_jax._src.text import TextDataError, char_stream, load_text, vocabulary
from rtrl_jax._src.trainer import init_train_state, make_train_chunk
from rtrl_jax.experiment import (
    ConfigError,
    ModelConfig,
    build_core,
    build_estimator,
    build_optimizer,
    enable_dtype,
    init_head,
    parse_override,
    read_yaml,
)

# --- influence balancing -------------------------------------------------------------------------


def influence_balancing_core(n: int = 23, num_plus: int = 10, theta: float = 0.5, dtype: Any = jnp.float32):
    """The influence-balancing chain of Tallec & Ollivier 2017 as a core with scalar parameter θ.

    Returns:
      ``(core, params, carry)``: ``params = {"theta": θ}``, ``carry`` all ones (the paper's start),
      input a dummy ``(1,)`` vector, output the whole state.
    """
    a = 0.5 * jnp.eye(n, dtype=dtype) + 0.5 * jnp.eye(n, k=1, dtype=dtype)
    v = jnp.concatenate([jnp.ones((num_plus,), dtype), -jnp.ones((n - num_plus,), dtype)])

    def apply(params, s, x):
        del x
        new = a @ s + params["theta"] * v
        return new, new

    params = {"theta": jnp.asarray(theta, dtype)}
    carry = jnp.ones((n,), dtype)
    core = from_function(apply, params=params, carry=carry, input_shape=(1,), name="influence_balancing")
    return core, params, carry


# per-estimator keys that are not estimator options: ``hidden``, ``batch_size`` and ``steps`` run
# that estimator at another size or budget than the config's (the expensive estimators at the
# largest size their cost allows).
_RUN_KEYS = ("hidden", "batch_size", "steps")
_SPEC_KEYS = ("estimator", "label", "learning_rate", *_RUN_KEYS)


def _estimator_label(spec: dict) -> str:
    options = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    if "label" in spec:
        return spec["label"]
    run = "".join(f" {k}={spec[k]}" for k in _RUN_KEYS if k in spec)
    lr = f" lr={spec['learning_rate']}" if "learning_rate" in spec else ""
    return spec["estimator"] + "".join(f" {k}={v}" for k, v in options.items()) + run + lr


def _run_config(cfg: dict, spec: dict) -> dict:
    """``cfg`` with ``spec``'s own ``hidden``, ``batch_size`` and ``steps`` (:data:`_RUN_KEYS`)."""
    return {**cfg, **{k: spec[k] for k in _RUN_KEYS if k in spec}}


def _make(spec: dict, core: Core):
    options = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    key = f"estimators[{_estimator_label(spec)}]"
    return build_estimator(spec["estimator"], options, core, key=key, options_key=key)


def run_influence_balancing(cfg: dict) -> dict:
    """Online SGD on θ with each estimator; the loss along the run and the final θ."""
    dtype = jnp.dtype(cfg["dtype"])
    core, params, carry = influence_balancing_core(cfg["n"], cfg["num_plus"], cfg["theta0"], dtype)
    steps, lr = cfg["steps"], cfg["learning_rate"]
    target = jnp.zeros((cfg["n"],), dtype).at[0].set(1.0)
    first = jnp.zeros((cfg["n"],), dtype).at[0].set(1.0)
    # the fixed point s* = (I - A)^{-1} θ v has s*¹ = 2θ·Σv, so the optimum is θ* = 1 / (2 Σv)
    theta_star = 1.0 / (2.0 * (2 * cfg["num_plus"] - cfg["n"]))
    rows = {}
    for seed in range(cfg["seeds"]):
        for spec in cfg["estimators"]:
            label = _estimator_label(spec)
            estimator = _make(spec, core)

            @jax.jit
            def run(key, estimator=estimator):
                trace = estimator.init(params, carry, key=jax.random.fold_in(key, 0))

                def body(state, step_key):
                    p, s, trace = state
                    s, _, trace = estimator.step(trace, p, s, jnp.zeros((1,), dtype), key=step_key)
                    loss = 0.5 * (s[0] - target[0]) ** 2
                    g = estimator.grad(trace, p, (s[0] - target[0]) * first)
                    p = jax.tree.map(lambda w, dw: w - lr * dw, p, g)
                    return (p, s, trace), (loss, p["theta"])

                keys = jax.random.split(jax.random.fold_in(key, 1), steps)
                _, (loss, theta) = jax.lax.scan(body, (params, carry, trace), keys)
                return loss, theta

            loss, theta = (np.asarray(a) for a in run(jax.random.PRNGKey(seed)))
            tail = max(1, steps // 10)
            final = float(np.mean(loss[-tail:]))
            entry = rows.setdefault(label, {"final_loss": [], "final_theta": [], "curves": []})
            entry["final_loss"].append(final if np.isfinite(final) else float("inf"))
            entry["final_theta"].append(float(theta[-1]) if np.isfinite(theta[-1]) else float("nan"))
            entry["curves"].append(_thin(loss))
    return {"theta_star": theta_star, "results": rows}


# --- trainer-based benchmarks --------------------------------------------------------------------


def _thin(values: np.ndarray, points: int = 200) -> list[float]:
    """A smoothed curve of at most ``points`` values (means over equal blocks)."""
    values = np.asarray(values, np.float64)
    block = max(1, values.shape[0] // points)
    usable = values.shape[0] // block * block
    out = values[:usable].reshape(-1, block).mean(axis=1)
    return [float(x) if np.isfinite(x) else None for x in out]


class _Machinery(NamedTuple):
    """What every seed of one (sizes, estimator, optimizer, rate) setting shares."""

    core: Core
    estimator: Any
    optimizer: Any
    head: Any
    chunk: Callable
    evaluate: Callable


@functools.cache
def _machinery(setting: str) -> _Machinery:
    """The core, estimator, optimizer, head and jitted functions of ``setting`` (a JSON string of
    ``cfg``'s model and optimizer keys, the spec, the input and class counts), built once so that
    further seeds and rates reuse the compiled chunk."""
    s = json.loads(setting)
    model = ModelConfig(cell=s["cell"], hidden=s["hidden"], dtype=s["dtype"])
    core = build_core(model, s["input_size"], key="cell")
    estimator = _make(s["spec"], core)
    optimizer = build_optimizer(
        s["optimizer"],
        s["learning_rate"],
        schedule=s["schedule"],
        decay_steps=s["steps"],
        clip=s["clip"],
        key="optimizer",
    )
    head, _ = init_head(jax.random.PRNGKey(0), core, s["num_classes"], jnp.dtype(s["dtype"]))
    chunk = make_train_chunk(core, estimator, optimizer, head=head)
    return _Machinery(core, estimator, optimizer, head, chunk, _bpc_evaluator(core, head, s["num_classes"]))


class _Learner:
    """A core, an estimator, a head and one jitted chunk of the online trainer.

    ``steps`` counts the training steps taken (each one step of every stream of the batch) and
    ``timed_s`` the seconds they took, the first chunk (which compiles) left out once a later chunk
    is timed: ``steps_per_s`` is the benchmark's own speed.
    """

    def __init__(self, cfg: dict, spec: dict, input_size: int, num_classes: int, seed: int):
        dtype = enable_dtype(cfg["dtype"], key="dtype")
        cfg = _run_config(cfg, spec)
        keys = ("cell", "hidden", "dtype", "optimizer", "learning_rate", "schedule", "steps", "clip")
        setting = {key: cfg[key] for key in keys}
        setting.update(
            learning_rate=spec.get("learning_rate", cfg["learning_rate"]),
            spec={k: v for k, v in spec.items() if k not in ("learning_rate", *_RUN_KEYS)},
            input_size=input_size,
            num_classes=num_classes,
        )
        self.parts = _machinery(json.dumps(setting, sort_keys=True))
        key_core, key_head, key_state = jax.random.split(jax.random.PRNGKey(seed), 3)
        params, _ = self.parts.core.init(key_core, dtype)
        _, head_params = init_head(key_head, self.parts.core, num_classes, dtype)
        self.state = init_train_state(
            self.parts.core,
            self.parts.estimator,
            self.parts.optimizer,
            params,
            head_params,
            batch_size=cfg["batch_size"],
            key=key_state,
        )
        self.dtype = dtype
        self.calls, self.steps, self.timed_steps, self.timed_s = 0, 0, 0, 0.0

    def train(self, stream: tasks.Stream) -> np.ndarray:
        """Trains over ``stream`` (batch, time); returns the per-step mean loss."""
        stream = stream._replace(
            inputs=stream.inputs.astype(self.dtype), targets=stream.targets.astype(self.dtype)
        )
        start = time.perf_counter()
        self.state, metrics = self.parts.chunk(self.state, stream)
        loss, weight = np.asarray(metrics.loss), np.asarray(metrics.weight)
        seconds, steps = time.perf_counter() - start, int(loss.shape[0])
        if self.calls == 1:  # the first chunk compiled: time from the second on
            self.timed_steps, self.timed_s = 0, 0.0
        self.calls, self.steps = self.calls + 1, self.steps + steps
        self.timed_steps, self.timed_s = self.timed_steps + steps, self.timed_s + seconds
        return np.where(weight > 0, loss / np.maximum(weight, 1e-30), np.nan)

    @property
    def steps_per_s(self) -> float:
        return self.timed_steps / max(self.timed_s, 1e-12)


def _rates(cfg: dict, spec: dict) -> list[float]:
    """The learning rates ``spec`` runs at: its own, else the config's sweep, else its one rate."""
    if "learning_rate" in spec:
        return [spec["learning_rate"]]
    return list(cfg["learning_rates"]) or [cfg["learning_rate"]]


def _sweep_then_seeds(
    cfg: dict,
    spec: dict,
    run_seed: Callable[[dict, int], dict],
    loss: Callable[[dict], float],
    sweep_seed: Callable[[dict, int], dict] | None = None,
) -> tuple[float, list[dict], dict[str, float]]:
    """Runs ``spec`` at every rate of :func:`_rates` on seed 0, then seeds ``1 .. seeds-1`` at the
    rate whose seed-0 run has the lowest ``loss`` (non-finite counts as worst).

    With ``sweep_seed`` (a cheaper run, e.g. a shorter one) and several rates, the rates are
    compared on its seed-0 runs and every seed ``0 .. seeds-1`` then runs at the best rate.

    Returns:
      ``(best rate, the runs at it (one per seed), {rate: seed-0 loss})``.
    """
    rates = _rates(cfg, spec)
    sweep_seed = sweep_seed if sweep_seed is not None and len(rates) > 1 else run_seed
    first = {rate: sweep_seed({**spec, "learning_rate": rate}, 0) for rate in rates}
    sweep = {str(rate): loss(run) for rate, run in first.items()}
    best = min(first, key=lambda rate: sweep[str(rate)] if np.isfinite(sweep[str(rate)]) else np.inf)
    kept = [first[best]] if sweep_seed is run_seed else []
    others = [run_seed({**spec, "learning_rate": best}, seed) for seed in range(len(kept), cfg["seeds"])]
    return best, [*kept, *others], sweep


def _collect(runs: list[dict]) -> dict[str, list]:
    """Per-seed runs (dicts of the same keys) as one dict of per-seed lists."""
    return {key: [run[key] for run in runs] for key in runs[0]}


def run_add(cfg: dict) -> dict:
    """Online training on the add task; final loss (mean over the last tenth of the steps).

    With ``learning_rates`` (a list) every estimator without its own ``learning_rate`` is run at
    each rate and reported at the rate with the lowest mean final loss over the seeds (the same
    seeds: a small, optimistic sweep, equal for all estimators); ``sweep`` keeps every rate's result.
    """
    task = tasks.add_task(cfg["t1"], cfg["t2"])
    streams = [
        tasks.sample_batch(task, jax.random.PRNGKey(1000 + seed), cfg["steps"], cfg["batch_size"])
        for seed in range(cfg["seeds"])
    ]
    rows, sweep = {}, {}
    for spec in cfg["estimators"]:
        label = _estimator_label(spec)
        for rate in _rates(cfg, spec):
            entry = {"learning_rate": rate, "final_loss": [], "wall_s": [], "curves": []}
            for seed, stream in enumerate(streams):
                learner = _Learner(
                    cfg, {**spec, "learning_rate": rate}, task.input_size, task.num_classes, seed
                )
                start = time.perf_counter()
                loss = np.concatenate(
                    [
                        learner.train(jax.tree.map(lambda a, b=b: a[:, b : b + cfg["chunk"]], stream))
                        for b in range(0, cfg["steps"], cfg["chunk"])
                    ]
                )
                tail = max(1, loss.shape[0] // 10)
                final = float(np.nanmean(loss[-tail:]))
                entry["final_loss"].append(final if np.isfinite(final) else float("inf"))
                entry["wall_s"].append(time.perf_counter() - start)
                entry["curves"].append(_thin(loss))
            sweep.setdefault(label, {})[str(rate)] = float(np.mean(entry["final_loss"]))
            if label not in rows or np.mean(entry["final_loss"]) < np.mean(rows[label]["final_loss"]):
                rows[label] = entry
    return {"baselines": tasks.add_task_baselines(cfg["t1"], cfg["t2"]), "results": rows, "sweep": sweep}


def _steps_to_level(lengths: list[int], level: int, check_every: int) -> int | None:
    """Training steps before the curriculum first trained at ``level`` (``lengths``: the level of
    each check of ``check_every`` steps), ``None`` if it never did."""
    return next((i * check_every for i, trained in enumerate(lengths) if trained >= level), None)


def run_copy_curriculum(cfg: dict) -> dict:
    """The copy task with a length curriculum; the length reached after ``steps`` steps.

    At curriculum level ``L`` every pattern has ``L`` symbols (``lengths: fixed``) or each
    episode draws its length uniformly from ``start_length .. L`` (``lengths: uniform``); ``L``
    grows by one after a check whose mean recall loss is below ``threshold``. Each estimator runs at
    every rate of ``learning_rates`` on seed 0 and the remaining seeds at the rate that reached the
    longest length there (:func:`_sweep_then_seeds`). With ``target_length`` each run also reports
    the steps it took to reach that level, and with ``stop_at_target`` it ends after its first
    check at that level (so ``target_length`` is the longest length it can report).
    """
    if cfg["lengths"] not in ("fixed", "uniform"):
        raise ConfigError(f"lengths: expected 'fixed' or 'uniform', got {cfg['lengths']!r}.")
    if cfg["stop_at_target"] and not cfg["target_length"]:
        raise ConfigError("stop_at_target: needs a target_length.")
    shortest = cfg["start_length"] if cfg["lengths"] == "uniform" else None
    task0 = tasks.copy_task(1, cfg["num_symbols"])

    @functools.cache
    def sampler(length: int) -> Callable[[jax.Array], tasks.Stream]:
        """The checks' data at ``length``, compiled once per level (one call per check)."""
        task = tasks.copy_task(length, cfg["num_symbols"], min_length=shortest)
        return jax.jit(lambda key: tasks.sample_batch(task, key, cfg["check_every"], cfg["batch_size"]))

    def run_seed(spec: dict, seed: int) -> dict:
        learner = _Learner(cfg, spec, task0.input_size, task0.num_classes, seed)
        length, lengths, losses = cfg["start_length"], [], []
        key = jax.random.PRNGKey(2000 + seed)
        start = time.perf_counter()
        for _ in range(0, cfg["steps"], cfg["check_every"]):
            if cfg["stop_at_target"] and lengths and lengths[-1] >= cfg["target_length"]:
                break
            key, sub = jax.random.split(key)
            loss = learner.train(sampler(length)(sub))
            mean = float(np.nanmean(loss)) if np.any(np.isfinite(loss)) else float("nan")
            losses.append(mean)
            lengths.append(length)
            if mean < cfg["threshold"]:
                length += 1
        target = cfg["target_length"]
        return {
            "length_reached": int(max(lengths) if lengths else length),
            "steps_to_target": _steps_to_level(lengths, target, cfg["check_every"]) if target else None,
            "length_curves": lengths,
            "loss_curves": losses,
            "steps_per_s": learner.steps_per_s,
            "wall_s": time.perf_counter() - start,
        }

    rows = {}
    for spec in cfg["estimators"]:
        rate, runs, sweep = _sweep_then_seeds(cfg, spec, run_seed, lambda run: -run["length_reached"])
        rows[_estimator_label(spec)] = {
            "learning_rate": rate,
            "sweep_length": {k: -v for k, v in sweep.items()},
            **_collect(runs),
        }
    return {"results": rows, "target_length": cfg["target_length"]}


class _CharData(NamedTuple):
    """The corpus split for the char-LM benchmark: character ids of each part, the vocabulary size."""

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int


def _char_data(cfg: dict) -> _CharData:
    """Reads ``text`` and holds out its last ``valid_fraction`` (a contiguous tail) for validation.

    The vocabulary is that of the whole text (the file's characters, sorted), so that a character
    met only in the tail still has an input and an output unit.
    """
    try:
        chars = load_text(Path(cfg["text"]).expanduser(), max_chars=cfg["max_chars"])
    except TextDataError as error:
        raise ConfigError(f"text: {error} Pass text=PATH to a text file.") from None
    vocab = vocabulary(chars)
    data = vocab.encode(chars)
    if not 0 < cfg["valid_fraction"] < 1:
        raise ConfigError(f"valid_fraction: must be between 0 and 1, got {cfg['valid_fraction']!r}.")
    n_valid = int(round(len(data) * cfg["valid_fraction"]))
    if n_valid < 2 * cfg["valid_streams"] or len(data) - n_valid < cfg["batch_size"] + 1:
        raise ConfigError(
            f"text: {cfg['text']!r} has {len(data)} characters, too few for valid_fraction ="
            f" {cfg['valid_fraction']}, valid_streams = {cfg['valid_streams']} and batch_size ="
            f" {cfg['batch_size']}."
        )
    return _CharData(data[:-n_valid], data[-n_valid:], len(vocab.chars))


def _char_chunk(ids: np.ndarray, offsets: np.ndarray, start: int, length: int, size: int) -> tasks.Stream:
    """Steps ``start .. start+length-1`` of the streams reading ``ids`` from ``offsets`` on.

    Stream ``b`` reads ``ids[(offsets[b] + t) % len(ids)]`` at step ``t`` and predicts the next one;
    its carry and trace reset at its first step and where it wraps to the start of the text.
    """
    positions = (offsets[:, None] + start + np.arange(length + 1)) % len(ids)
    stream = char_stream(ids[positions], size)
    reset = (positions[:, :-1] == 0) | ((start + np.arange(length)) == 0)
    return stream._replace(reset=jnp.asarray(reset))


def run_char_lm(cfg: dict) -> dict:
    """Character-level language modelling; validation bits per character of each estimator.

    ``batch_size`` streams read the training part contiguously, starting at evenly spaced offsets
    (shifted by a seed's random amount), one character per step; the carry runs on across chunks,
    so a stream sees unbroken text. ``steps · batch_size`` characters are read; while that is less
    than the training part no character is read twice, and the training loss of each step is
    measured before the update it causes (an online, held-out estimate: the curves). At the end
    the validation part is read by ``valid_streams`` contiguous segments, each from a zero carry.
    Each estimator runs at every rate of ``learning_rates`` on seed 0 and the remaining seeds at
    the rate with the lowest validation bits/char there (:func:`_sweep_then_seeds`); with
    ``sweep_fraction < 1`` the rates are compared on seed-0 runs of that fraction of the steps (the
    rate schedule compressed to it) and all seeds then run the whole budget at the best rate. An
    estimator's own ``hidden``, ``batch_size`` and ``steps`` replace the config's for it.
    """
    data = _char_data(cfg)
    size = data.vocab_size
    segment = len(data.valid) // cfg["valid_streams"]
    valid = data.valid[: segment * cfg["valid_streams"]].reshape(cfg["valid_streams"], segment)

    def run_seed(spec: dict, seed: int, fraction: float = 1.0) -> dict:
        spec = {**spec, "steps": max(1, round(_run_config(cfg, spec)["steps"] * fraction))}
        run = _run_config(cfg, spec)
        learner = _Learner(cfg, spec, size, size, seed)
        shift = np.random.default_rng(3000 + seed).integers(len(data.train))
        offsets = (np.arange(run["batch_size"]) * len(data.train) // run["batch_size"] + shift) % len(
            data.train
        )
        start_time = time.perf_counter()
        loss = np.concatenate(
            [
                learner.train(_char_chunk(data.train, offsets, b, min(run["chunk"], run["steps"] - b), size))
                for b in range(0, run["steps"], run["chunk"])
            ]
        )
        return {
            "valid_bpc": float(learner.parts.evaluate(learner.state.params, jnp.asarray(valid))),
            "train_bpc_curves": _thin(loss / np.log(2.0)),
            "steps_per_s": learner.steps_per_s,
            "wall_s": time.perf_counter() - start_time,
        }

    if not 0 < cfg["sweep_fraction"] <= 1:
        raise ConfigError(f"sweep_fraction: must be in (0, 1], got {cfg['sweep_fraction']!r}.")
    short = functools.partial(run_seed, fraction=cfg["sweep_fraction"]) if cfg["sweep_fraction"] < 1 else None
    rows = {}
    for spec in cfg["estimators"]:
        rate, runs, sweep = _sweep_then_seeds(cfg, spec, run_seed, lambda run: run["valid_bpc"], short)
        label = _estimator_label(spec)
        rows[label] = {
            **{k: _run_config(cfg, spec)[k] for k in _RUN_KEYS},
            "learning_rate": rate,
            "sweep_valid_bpc": sweep,
            **_collect(runs),
        }
        # each estimator's result as it finishes: a long table stopped early still reports them
        print(
            f"{label}: {json.dumps({**rows[label], 'train_bpc_curves': None})}", file=sys.stderr, flush=True
        )
    return {
        "vocab_size": size,
        "train_chars": len(data.train),
        "valid_chars": int(valid.size),
        "unigram_bpc": _unigram_bpc(data.train, data.valid, size),
        "sweep_fraction": cfg["sweep_fraction"],
        "results": rows,
    }


def _bpc_evaluator(core: Core, head: Any, size: int) -> Callable:
    """``evaluate(params, ids) -> bits/char`` of ``core`` and ``head`` on the id segments ``ids``
    (segments, time), each read from a zero carry; every prediction of a next character counts once."""

    @jax.jit
    def evaluate(params, ids):
        dtype = jax.tree.leaves(params["head"])[0].dtype

        def body(carry, step):
            x, y = (jax.nn.one_hot(i, size, dtype=dtype) for i in step)
            carry, out = jax.vmap(core.apply, in_axes=(None, 0, 0))(params["core"], carry, x)
            logits = jax.vmap(head.apply, in_axes=(None, 0))(params["head"], out)
            return carry, -jnp.sum(y * jax.nn.log_softmax(logits))

        zero = core.initial_carry(dtype)
        carry = jax.tree.map(lambda c: jnp.broadcast_to(c, (ids.shape[0], *c.shape)), zero)
        _, nll = jax.lax.scan(body, carry, (ids[:, :-1].T, ids[:, 1:].T))
        return jnp.sum(nll) / (ids.shape[0] * (ids.shape[1] - 1)) / jnp.log(2.0)

    return evaluate


def _unigram_bpc(train_ids: np.ndarray, valid_ids: np.ndarray, size: int) -> float:
    counts = np.bincount(train_ids, minlength=size) + 1.0
    probs = counts / counts.sum()
    return float(-np.mean(np.log2(probs[valid_ids[1:]])))


# --- configs, dispatch, outputs --------------------------------------------------------------------

_TRAINER_DEFAULTS = {
    "seeds": 1,
    "cell": "simple",
    "hidden": 32,
    "dtype": "float32",
    "optimizer": "sgd",
    "learning_rate": 0.05,
    "schedule": "constant",
    "clip": 0.0,
    "batch_size": 1,
    "steps": 10000,
    "chunk": 1000,
}


def load_benchmark_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Reads a benchmark YAML (key ``benchmark:``), picks its scale, applies ``key=value`` overrides,
    fills defaults.

    A config may hold ``scales: {cpu: {...}, paper: {...}}``: the keys of the chosen scale (``scale:``
    in the file or as an override; ``cpu`` by default) replace the top-level ones, and the overrides
    replace both. ``cfg["scale"]`` names the scale used.
    """
    data = read_yaml(path)
    given = {}
    for text in overrides:
        key, value = parse_override(text)
        if len(key) != 1:
            raise ConfigError(f"override {text!r}: benchmark configs are flat (key=value).")
        given[key[0]] = value
    scales = data.pop("scales", {})
    scale = given.get("scale", data.get("scale", "cpu"))
    if scales or scale != "cpu":
        if not isinstance(scales, dict) or scale not in scales or not isinstance(scales[scale], dict):
            names = ", ".join(scales) if isinstance(scales, dict) and scales else "none"
            raise ConfigError(f"scale: {scale!r} is not a scale of {path} (its scales: {names}).")
        data.update(scales[scale])
    data.update(given)
    data["scale"] = scale
    name = data.get("benchmark")
    if name not in BENCHMARKS:
        raise ConfigError(f"benchmark: {name!r} is not one of {', '.join(BENCHMARKS)}.")
    defaults = BENCHMARKS[name].defaults
    unknown = sorted(set(data) - set(defaults) - {"benchmark", "scale"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} for benchmark {name}; allowed: {', '.join(defaults)}.")
    cfg = {**defaults, **data}
    for spec in cfg["estimators"]:
        if not isinstance(spec, dict) or "estimator" not in spec:
            raise ConfigError(f"estimators: each entry needs an 'estimator:' name, got {spec!r}.")
    return cfg


def _influence_balancing_table(result: dict) -> str:
    head = (
        "| estimator | final loss (mean over seeds) | final θ (θ* = {:.4f}) | diverged |\n|---|---|---|---|\n"
    )
    lines = [head.format(result["theta_star"])]
    for label, r in result["results"].items():
        finite = [x for x in r["final_loss"] if np.isfinite(x) and x < 1e6]
        loss = f"{np.mean(finite):.3g}" if len(finite) == len(r["final_loss"]) else "diverged"
        thetas = [t for t in r["final_theta"] if np.isfinite(t)]
        theta = f"{np.mean(thetas):.4g}" if thetas else "nan"
        lines.append(
            f"| {label} | {loss} | {theta} | {len(r['final_loss']) - len(finite)}/{len(r['final_loss'])} |\n"
        )
    return "".join(lines)


def _add_table(result: dict) -> str:
    b = result["baselines"]
    lines = [
        f"Baselines (cross-entropy): no memory {b['no_memory']:.3f}, t1 only {b['t1_only']:.3f},"
        f" both lags {b['both']:.3f}.\n\n| estimator | learning rate | final loss (mean ± sd over seeds)"
        " | s/run | final loss at each rate |\n|---|---|---|---|---|\n"
    ]
    for label, r in result["results"].items():
        rates = ", ".join(f"{k}: {v:.3f}" for k, v in result["sweep"][label].items())
        lines.append(
            f"| {label} | {r['learning_rate']} | {np.mean(r['final_loss']):.4f} ±"
            f" {np.std(r['final_loss']):.4f} | {np.mean(r['wall_s']):.1f} | {rates} |\n"
        )
    return "".join(lines)


def _speed(r: dict) -> str:
    return f"{np.mean(r['steps_per_s']):.0f} | {np.mean(r['wall_s']):.0f}"


def _copy_curriculum_table(result: dict) -> str:
    target = result.get("target_length")
    to_target = f" steps to length {target} |" if target else ""
    lines = [
        "| estimator | learning rate | length reached (mean ± sd over seeds) | per seed |"
        f"{to_target} steps/s | s/run | length at each rate (seed 0) |\n"
        f"|---|---|---|---|{'---|' if target else ''}---|---|---|\n"
    ]
    for label, r in result["results"].items():
        rates = ", ".join(f"{k}: {v}" for k, v in r["sweep_length"].items())
        steps = ", ".join("–" if s is None else f"{s:,}" for s in r["steps_to_target"]) if target else ""
        lines.append(
            f"| {label} | {r['learning_rate']} | {np.mean(r['length_reached']):.2f} ±"
            f" {np.std(r['length_reached']):.2f} | {r['length_reached']} |{f' {steps} |' if target else ''}"
            f" {_speed(r)} | {rates} |\n"
        )
    return "".join(lines)


def _char_lm_table(result: dict) -> str:
    fraction = result["sweep_fraction"]
    sweep = "seed 0" if fraction == 1 else f"seed 0, {fraction:g} of the steps"
    lines = [
        f"Unigram baseline: {result['unigram_bpc']:.3f} bits/char (vocabulary {result['vocab_size']};"
        f" {result['train_chars']} training, {result['valid_chars']} validation characters).\n\n"
        "| estimator | hidden | streams × steps | learning rate | validation bits/char (mean ± sd over"
        f" seeds) | per seed | steps/s | s/run | bits/char at each rate ({sweep}) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    ]
    for label, r in result["results"].items():
        seeds = ", ".join(f"{v:.3f}" for v in r["valid_bpc"])
        rates = ", ".join(f"{k}: {v:.3f}" for k, v in r["sweep_valid_bpc"].items())
        lines.append(
            f"| {label} | {r['hidden']} | {r['batch_size']} × {r['steps']} | {r['learning_rate']} |"
            f" {np.mean(r['valid_bpc']):.4f} ±"
            f" {np.std(r['valid_bpc']):.4f} | {seeds} | {_speed(r)} | {rates} |\n"
        )
    return "".join(lines)


def _log_scale(ax: Any, result: dict) -> None:
    del result
    ax.set_yscale("log")


def _baselines(ax: Any, result: dict) -> None:
    for base, value in result["baselines"].items():
        ax.axhline(value, color="gray", ls=":", lw=0.8)
        ax.text(1.0, value, base, fontsize=7, va="bottom", ha="right")


def _target_length(ax: Any, result: dict) -> None:
    if result.get("target_length"):
        ax.axhline(result["target_length"], color="grey", linestyle="--", linewidth=0.8)


def _no_decoration(ax: Any, result: dict) -> None:
    del ax, result


def _budget_fraction(cfg: dict, points: int) -> tuple[np.ndarray, str]:
    del cfg
    return np.linspace(0, 1, points), "fraction of the step budget"


def _steps_checked(cfg: dict, points: int) -> tuple[np.ndarray, str]:
    return cfg["check_every"] * np.arange(1, points + 1), "training steps"


def _characters_seen(cfg: dict, points: int) -> tuple[np.ndarray, str]:
    block = max(1, cfg["steps"] // points)  # the blocks of _thin
    return block * cfg["batch_size"] * np.arange(1, points + 1), "training characters seen (all streams)"


class Benchmark(NamedTuple):
    """A learning benchmark.

    Attributes:
      defaults: its config keys with their defaults (``benchmark:`` aside).
      run: ``cfg -> result`` (``{"results": {label: {...}}, ...}``).
      table: ``result -> markdown``.
      curves: the key of each estimator's learning curves in its result.
      ylabel: the curves' quantity.
      decorate: ``(axes, result) -> None``: what the plot adds to the curves.
      x_axis: ``(cfg, points) -> (x values, label)`` of a curve of ``points`` values.
    """

    defaults: dict[str, Any]
    run: Callable[[dict], dict]
    table: Callable[[dict], str]
    curves: str
    ylabel: str
    decorate: Callable[[Any, dict], None] = _no_decoration
    x_axis: Callable[[dict, int], tuple[np.ndarray, str]] = _budget_fraction


BENCHMARKS: dict[str, Benchmark] = {
    "influence_balancing": Benchmark(
        defaults={
            "n": 23,
            "num_plus": 10,
            "theta0": 0.5,
            "dtype": "float32",
            "steps": 20000,
            "learning_rate": 1e-3,
            "seeds": 1,
            "estimators": [{"estimator": "rtrl"}, {"estimator": "uoro"}],
        },
        run=run_influence_balancing,
        table=_influence_balancing_table,
        curves="curves",
        ylabel="loss ½(s¹−1)²",
        decorate=_log_scale,
    ),
    "add": Benchmark(
        defaults={
            **_TRAINER_DEFAULTS,
            "t1": 5,
            "t2": 9,
            "learning_rates": [],
            "estimators": [{"estimator": "rtrl"}],
        },
        run=run_add,
        table=_add_table,
        curves="curves",
        ylabel="cross-entropy",
        decorate=_baselines,
    ),
    "copy_curriculum": Benchmark(
        defaults={
            **_TRAINER_DEFAULTS,
            "num_symbols": 2,
            "start_length": 1,
            "threshold": 0.15,
            "check_every": 100,
            "lengths": "fixed",
            "target_length": None,
            "stop_at_target": False,
            "learning_rates": [],
            "estimators": [{"estimator": "rtrl"}],
        },
        run=run_copy_curriculum,
        table=_copy_curriculum_table,
        curves="length_curves",
        ylabel="copy length (dashed: target_length)",
        decorate=_target_length,
        x_axis=_steps_checked,
    ),
    "char_lm": Benchmark(
        defaults={
            **_TRAINER_DEFAULTS,
            "text": "",
            "max_chars": None,
            "valid_fraction": 0.1,
            "valid_streams": 16,
            "sweep_fraction": 1.0,
            "learning_rates": [],
            "estimators": [{"estimator": "rtrl"}],
        },
        run=run_char_lm,
        table=_char_lm_table,
        curves="train_bpc_curves",
        ylabel="online training bits/char (before each update)",
        x_axis=_characters_seen,
    ),
}


def _plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = document["benchmark"]
    benchmark = BENCHMARKS[name]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in document["results"].items():
        curves = [np.array([np.nan if v is None else v for v in c], np.float64) for c in r[benchmark.curves]]
        size = max(len(c) for c in curves)
        # a run that ended early (copy's stop_at_target) is held at its last value
        held = [np.pad(c, (0, size - len(c)), mode="edge") for c in curves]
        with warnings.catch_warnings():  # all-NaN columns after a divergence
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(np.stack(held), axis=0)
        x, xlabel = benchmark.x_axis(_run_config(document["config"], r), size)
        ax.plot(x, mean, label=label)
    benchmark.decorate(ax, document)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(benchmark.ylabel)
    ax.set_title(f"{name} ({document['config']['scale']} scale): learning curves (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def output_stem(cfg: dict) -> str:
    """The outputs' file name without suffix: the benchmark's name, ``_<scale>`` added but for ``cpu``."""
    return cfg["benchmark"] if cfg["scale"] == "cpu" else f"{cfg['benchmark']}_{cfg['scale']}"


def run_benchmark(cfg: dict, out_dir: str | Path) -> dict:
    """Runs the benchmark of ``cfg`` and writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``
    (:func:`output_stem`)."""
    name, stem = cfg["benchmark"], output_stem(cfg)
    enable_dtype(cfg["dtype"], key="dtype")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = BENCHMARKS[name].run(cfg)
    device = jax.devices()[0]
    document = {
        "benchmark": name,
        "config": cfg,
        "device": f"{device.platform}:{device.device_kind}",
        "jax_version": jax.__version__,
        "wall_s": time.perf_counter() - start,
        **result,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(document, indent=1, default=float) + "\n")
    (out_dir / f"{stem}.md").write_text(BENCHMARKS[name].table(result))
    _plot(document, out_dir / f"{stem}.png")
    return document


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a configs/bench_*.yaml file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (flat keys)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    try:
        document = run_benchmark(load_benchmark_config(args.config, args.overrides), args.out)
    except ConfigError as error:
        print(f"learning.py: invalid configuration: {error}", file=sys.stderr)
        return 2
    stem = output_stem(document["config"])
    print((Path(args.out) / f"{stem}.md").read_text())
    print(
        f"{document['device']}, jax {document['jax_version']}, {document['wall_s']:.0f} s;"
        f" wrote {args.out}/{stem}.json, .md, .png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
