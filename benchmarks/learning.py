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
  check interval falls below a threshold; the length reached in a fixed step budget, over seeds.
- ``char_lm``: character-level language modelling of a text file; validation bits per character.
"""

from __future__ import annotations

import argparse
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


_SPEC_KEYS = ("estimator", "label", "learning_rate")  # per-estimator keys that are not estimator options


def _estimator_label(spec: dict) -> str:
    options = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    if "label" in spec:
        return spec["label"]
    lr = f" lr={spec['learning_rate']}" if "learning_rate" in spec else ""
    return spec["estimator"] + "".join(f" {k}={v}" for k, v in options.items()) + lr


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


class _Learner:
    """A core, an estimator, a head and one jitted chunk of the online trainer."""

    def __init__(self, cfg: dict, spec: dict, input_size: int, num_classes: int, seed: int):
        dtype = enable_dtype(cfg["dtype"], key="dtype")
        model = ModelConfig(cell=cfg["cell"], hidden=cfg["hidden"], dtype=cfg["dtype"])
        self.core = build_core(model, input_size, key="cell")
        self.estimator = _make(spec, self.core)
        optimizer = build_optimizer(
            cfg["optimizer"],
            spec.get("learning_rate", cfg["learning_rate"]),
            clip=cfg["clip"],
            key="optimizer",
        )
        key_core, key_head, key_state = jax.random.split(jax.random.PRNGKey(seed), 3)
        params, _ = self.core.init(key_core, dtype)
        self.head, head_params = init_head(key_head, self.core, num_classes, dtype)
        self.state = init_train_state(
            self.core,
            self.estimator,
            optimizer,
            params,
            head_params,
            batch_size=cfg["batch_size"],
            key=key_state,
        )
        self.chunk = make_train_chunk(self.core, self.estimator, optimizer, head=self.head)
        self.dtype = dtype

    def train(self, stream: tasks.Stream) -> np.ndarray:
        """Trains over ``stream`` (batch, time); returns the per-step mean loss."""
        stream = stream._replace(
            inputs=stream.inputs.astype(self.dtype), targets=stream.targets.astype(self.dtype)
        )
        self.state, metrics = self.chunk(self.state, stream)
        loss, weight = np.asarray(metrics.loss), np.asarray(metrics.weight)
        return np.where(weight > 0, loss / np.maximum(weight, 1e-30), np.nan)


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
        rates = (
            [spec["learning_rate"]]
            if "learning_rate" in spec
            else cfg["learning_rates"] or [cfg["learning_rate"]]
        )
        label = _estimator_label(spec)
        for rate in rates:
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


def run_copy_curriculum(cfg: dict) -> dict:
    """The copy task with a length curriculum; the length reached after ``steps`` steps."""
    rows = {}
    task0 = tasks.copy_task(1, cfg["num_symbols"])
    for seed in range(cfg["seeds"]):
        for spec in cfg["estimators"]:
            label = _estimator_label(spec)
            learner = _Learner(cfg, spec, task0.input_size, task0.num_classes, seed)
            length, lengths, losses = cfg["start_length"], [], []
            key = jax.random.PRNGKey(2000 + seed)
            for _ in range(0, cfg["steps"], cfg["check_every"]):
                key, sub = jax.random.split(key)
                task = tasks.copy_task(length, cfg["num_symbols"])
                loss = learner.train(tasks.sample_batch(task, sub, cfg["check_every"], cfg["batch_size"]))
                mean = float(np.nanmean(loss)) if np.any(np.isfinite(loss)) else float("nan")
                losses.append(mean)
                lengths.append(length)
                if mean < cfg["threshold"]:
                    length += 1
            entry = rows.setdefault(label, {"length_reached": [], "length_curves": [], "loss_curves": []})
            entry["length_reached"].append(int(max(lengths) if lengths else length))
            entry["length_curves"].append(lengths)
            entry["loss_curves"].append(losses)
    return {"results": rows}


def run_char_lm(cfg: dict) -> dict:
    """Character-level language modelling; validation bits per character of each estimator."""
    try:
        chars = load_text(Path(cfg["text"]).expanduser(), max_chars=cfg["max_chars"])
    except TextDataError as error:
        raise ConfigError(f"text: {error} Pass text=PATH to a text file.") from None
    vocab = vocabulary(chars).chars
    data = vocabulary(chars).encode(chars)
    n_valid = cfg["valid_chars"]
    if len(data) < n_valid + cfg["steps"] + 2:
        raise ConfigError(
            f"text: {cfg['text']!r} has {len(data)} characters, fewer than valid_chars + steps + 2."
        )
    train_ids, valid_ids = data[:-n_valid], data[-n_valid:]
    size = len(vocab)
    rows = {}
    for seed in range(cfg["seeds"]):
        rng = np.random.default_rng(3000 + seed)
        starts = rng.integers(0, len(train_ids) - cfg["steps"] - 1, cfg["batch_size"])
        ids = np.stack([train_ids[s : s + cfg["steps"] + 1] for s in starts])
        stream = char_stream(ids, size)
        valid = char_stream(valid_ids[None, :], size)
        for spec in cfg["estimators"]:
            label = _estimator_label(spec)
            learner = _Learner(cfg, spec, size, size, seed)
            loss = np.concatenate(
                [
                    learner.train(jax.tree.map(lambda a, b=b: a[:, b : b + cfg["chunk"]], stream))
                    for b in range(0, cfg["steps"], cfg["chunk"])
                ]
            )
            bpc = _evaluate_bpc(learner, valid)
            entry = rows.setdefault(label, {"valid_bpc": [], "train_bpc_curves": []})
            entry["valid_bpc"].append(bpc)
            entry["train_bpc_curves"].append(_thin(loss / np.log(2.0)))
    return {"vocab_size": size, "unigram_bpc": _unigram_bpc(train_ids, valid_ids, size), "results": rows}


def _evaluate_bpc(learner: _Learner, valid: tasks.Stream) -> float:
    """Bits per character of the trained core and head on ``valid``, from a zero carry."""
    core, params = learner.core, learner.state.params

    @jax.jit
    def evaluate(inputs, targets):
        carry = core.initial_carry(learner.dtype)

        def body(carry, step):
            x, y = step
            carry, out = core.apply(params["core"], carry, x)
            logits = learner.head.apply(params["head"], out)
            return carry, -jnp.sum(y * jax.nn.log_softmax(logits))

        _, nll = jax.lax.scan(body, carry, (inputs.astype(learner.dtype), targets.astype(learner.dtype)))
        return jnp.mean(nll) / jnp.log(2.0)

    return float(evaluate(valid.inputs[0], valid.targets[0]))


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
    "clip": 0.0,
    "batch_size": 1,
    "steps": 10000,
    "chunk": 1000,
}


def load_benchmark_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Reads a benchmark YAML (key ``benchmark:``), applies ``key=value`` overrides, fills defaults."""
    data = read_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        if len(key) != 1:
            raise ConfigError(f"override {text!r}: benchmark configs are flat (key=value).")
        data[key[0]] = value
    name = data.get("benchmark")
    if name not in BENCHMARKS:
        raise ConfigError(f"benchmark: {name!r} is not one of {', '.join(BENCHMARKS)}.")
    defaults = BENCHMARKS[name].defaults
    unknown = sorted(set(data) - set(defaults) - {"benchmark"})
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


def _copy_curriculum_table(result: dict) -> str:
    lines = ["| estimator | length reached (mean) | per seed |\n|---|---|---|\n"]
    for label, r in result["results"].items():
        lines.append(f"| {label} | {np.mean(r['length_reached']):.2f} | {r['length_reached']} |\n")
    return "".join(lines)


def _char_lm_table(result: dict) -> str:
    lines = [
        f"Unigram baseline: {result['unigram_bpc']:.3f} bits/char (vocabulary {result['vocab_size']}).\n\n"
        "| estimator | validation bits/char (mean ± sd over seeds) |\n|---|---|\n"
    ]
    for label, r in result["results"].items():
        lines.append(f"| {label} | {np.mean(r['valid_bpc']):.4f} ± {np.std(r['valid_bpc']):.4f} |\n")
    return "".join(lines)


def _log_scale(ax: Any, result: dict) -> None:
    del result
    ax.set_yscale("log")


def _baselines(ax: Any, result: dict) -> None:
    for base, value in result["baselines"].items():
        ax.axhline(value, color="gray", ls=":", lw=0.8)
        ax.text(1.0, value, base, fontsize=7, va="bottom", ha="right")


def _no_decoration(ax: Any, result: dict) -> None:
    del ax, result


class Benchmark(NamedTuple):
    """A learning benchmark.

    Attributes:
      defaults: its config keys with their defaults (``benchmark:`` aside).
      run: ``cfg -> result`` (``{"results": {label: {...}}, ...}``).
      table: ``result -> markdown``.
      curves: the key of each estimator's learning curves in its result.
      ylabel: the curves' quantity.
      decorate: ``(axes, result) -> None``: what the plot adds to the curves.
    """

    defaults: dict[str, Any]
    run: Callable[[dict], dict]
    table: Callable[[dict], str]
    curves: str
    ylabel: str
    decorate: Callable[[Any, dict], None] = _no_decoration


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
            "estimators": [{"estimator": "rtrl"}],
        },
        run=run_copy_curriculum,
        table=_copy_curriculum_table,
        curves="length_curves",
        ylabel="copy length",
    ),
    "char_lm": Benchmark(
        defaults={
            **_TRAINER_DEFAULTS,
            "text": "",
            "max_chars": 200000,
            "valid_chars": 5000,
            "estimators": [{"estimator": "rtrl"}],
        },
        run=run_char_lm,
        table=_char_lm_table,
        curves="train_bpc_curves",
        ylabel="training bits/char",
    ),
}


def _plot(name: str, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmark = BENCHMARKS[name]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in result["results"].items():
        curves = [np.array([np.nan if v is None else v for v in c], np.float64) for c in r[benchmark.curves]]
        size = min(len(c) for c in curves)
        with warnings.catch_warnings():  # all-NaN columns after a divergence
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(np.stack([c[:size] for c in curves]), axis=0)
        ax.plot(np.linspace(0, 1, size), mean, label=label)
    benchmark.decorate(ax, result)
    ax.set_xlabel("fraction of the step budget")
    ax.set_ylabel(benchmark.ylabel)
    ax.set_title(f"{name}: learning curves (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_benchmark(cfg: dict, out_dir: str | Path) -> dict:
    """Runs the benchmark of ``cfg`` and writes ``<name>.json``, ``<name>.md`` and ``<name>.png``."""
    name = cfg["benchmark"]
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
    (out_dir / f"{name}.json").write_text(json.dumps(document, indent=1, default=float) + "\n")
    (out_dir / f"{name}.md").write_text(BENCHMARKS[name].table(result))
    _plot(name, result, out_dir / f"{name}.png")
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
    name = document["benchmark"]
    print((Path(args.out) / f"{name}.md").read_text())
    print(
        f"{document['device']}, jax {document['jax_version']}, {document['wall_s']:.0f} s;"
        f" wrote {args.out}/{name}.json, .md, .png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
