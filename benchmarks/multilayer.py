"""Multi-layer models trained online against BPTT on the same budget.

``python benchmarks/multilayer.py configs/bench_multilayer.yaml [key=value ...] [--out DIR]``

Every (model, task, method) of the config is one ``rtrl-jax train`` spec built by the experiment
layer (:func:`rtrl_jax.experiment.build`): the model's, the task's and the method's dotted
overrides, then the shared ``train.*`` keys. All runs of a task see the same streams (same seed),
the same number of steps and the same optimizer; the methods differ only in the gradient:

- per-layer traces (``model.traces=per_layer``): each recurrent layer keeps its own trace (exact
  RTRL or SnAp-1 per layer) and gradients cross layers at the current step only (Zucchet et al.
  2023, arXiv:2305.15947);
- whole-stack exact RTRL (``model.traces=stack``, ``rtrl``): one trace over every layer's
  parameters, the exact online gradient of each step's loss (the stack's ``S²P`` cost);
- BPTT: truncated BPTT over aligned windows of the whole stack (``tbptt``, ``aligned=true``) with the
  update summed over each window (``train.update_every`` = window), i.e. classic BPTT(k); on the
  copy task the window is one episode, so it is full BPTT per episode.

Reported per run: the loss over the last fifth of the steps (bits per character for ``char``; the
recall cross-entropy in nats and the recall accuracy for ``copy``), the wall time per training step
and its ratio to the model's forward pass alone, measured in the same run (``inference``: the same
layers with a one-step buffer in place of a trace, no gradient). Outputs: ``multilayer.json``,
``multilayer.md`` (the table) and ``multilayer.png`` (learning curves) in DIR (default
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtrl_jax._src.layers import apply_model
from rtrl_jax._src.trainer import MODEL_RNG_STREAMS, train_model_online
from rtrl_jax.experiment import ConfigError, Experiment, build, load_config, parse_override, read_yaml

DEFAULTS: dict[str, Any] = {
    "steps": 2000,
    "batch_size": 8,
    "learning_rate": 0.003,
    "chunk": 250,
    "seed": 0,
    "models": {},
    "tasks": {},
    "methods": {},
    "inference": ["estimator=tbptt", "estimator_options.window=1"],
}
TAIL = 5  # the final loss is the mean over the last 1/TAIL of the steps


def load_multilayer_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Reads the benchmark YAML, applies flat ``key=value`` overrides and fills the defaults."""
    data = read_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        if len(key) != 1:
            raise ConfigError(f"override {text!r}: the benchmark config is flat at the top (key=value).")
        data[key[0]] = value
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; allowed: {', '.join(DEFAULTS)}.")
    cfg = {**DEFAULTS, **data}
    for key in ("models", "tasks", "methods"):
        if not isinstance(cfg[key], dict) or not cfg[key]:
            raise ConfigError(f"{key}: expected a non-empty mapping of name -> overrides, got {cfg[key]!r}.")
    for name, task in cfg["tasks"].items():
        if not isinstance(task, dict) or set(task) != {"overrides", "window"}:
            raise ConfigError(f"tasks.{name}: expected {{overrides: [...], window: N}}, got {task!r}.")
    return cfg


def run_spec(cfg: dict, model: list[str], task: dict, method: list[str]) -> Experiment:
    """The built experiment of one (model, task, method): its overrides, then the shared train keys."""
    window = str(task["window"])
    overrides = [*model, *task["overrides"], *(o.replace("{window}", window) for o in method)]
    train = {
        "steps": cfg["steps"],
        "batch_size": cfg["batch_size"],
        "learning_rate": cfg["learning_rate"],
        "chunk_size": cfg["chunk"],
        "seed": cfg["seed"],
        "checkpoint_every": 0,
    }
    return build(load_config(None, [*overrides, *(f"train.{k}={v}" for k, v in train.items())]))


def _train(built: Experiment) -> dict:
    """Trains online; the per-step losses, accuracies and the wall time of each chunk."""
    ends = [time.perf_counter()]
    state, metrics = train_model_online(
        built.model,
        built.optimizer,
        built.data,
        built.state,
        chunk_size=built.spec.train.chunk_size,
        callback=lambda state, metrics: ends.append(time.perf_counter()),
        nonfinite=built.spec.train.nonfinite,
    )
    chunk_s = np.diff(ends)
    # the first chunk compiles; the others time the steps (one chunk only: its time, compile included)
    step_s = float(np.median(chunk_s[1:]) if len(chunk_s) > 1 else chunk_s[0]) / built.spec.train.chunk_size
    return {"metrics": metrics, "step_s": step_s, "skipped": int(np.count_nonzero(metrics.nonfinite))}


def _inference_step_s(built: Experiment, repeats: int = 3) -> float:
    """Wall time per step of the model's forward pass over one chunk of its streams (no gradient).

    With an online layer's estimator this includes the update of its trace (the final state is
    returned, so XLA cannot drop it).
    """
    stream = built.data.chunk(0, built.spec.train.chunk_size)
    state = built.state
    rngs = {name: state.key for name in MODEL_RNG_STREAMS}
    dtype = jax.tree.leaves(state.params)[0].dtype
    inputs = stream.inputs.astype(dtype) if np.issubdtype(stream.inputs.dtype, np.floating) else stream.inputs

    @jax.jit
    def forward(params, online, inputs, reset):
        def body(online, step):
            out, online = apply_model(built.model, params, online, *step, rngs)
            return online, out

        # the final state is returned too: a trace nothing reads would be dead code to XLA
        return jax.lax.scan(body, online, (jnp.swapaxes(inputs, 0, 1), jnp.swapaxes(reset, 0, 1)))

    jax.block_until_ready(forward(state.params, state.online, inputs, stream.reset))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(state.params, state.online, inputs, stream.reset))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / built.spec.train.chunk_size


def _summary(task: str, metrics: Any) -> dict:
    """The final loss and accuracy over the last fifth of the steps, and a thinned learning curve."""
    steps = metrics.loss.shape[0]
    tail = slice(steps - max(1, steps // TAIL), None)
    scale = 1 / math.log(2) if task == "char" else 1.0  # nats -> bits per character
    weight = max(float(metrics.weight[tail].sum()), 1e-12)
    block = max(1, steps // 40)
    usable = steps // block * block
    curve = metrics.loss[:usable].reshape(-1, block).sum(1) / np.maximum(
        metrics.weight[:usable].reshape(-1, block).sum(1), 1e-12
    )
    return {
        "final_loss": float(metrics.loss[tail].sum()) / weight * scale,
        "final_accuracy": float(metrics.correct[tail].sum()) / weight,
        "curve": [float(v) * scale if np.isfinite(v) else None for v in curve],
        "curve_step": block,
    }


def run_multilayer(cfg: dict) -> dict:
    """Every (model, task, method) run of ``cfg``: ``{model: {task: {method: result}}}``."""
    results: dict[str, dict] = {}
    for model_name, model in cfg["models"].items():
        for task_name, task in cfg["tasks"].items():
            rows = results.setdefault(model_name, {}).setdefault(task_name, {})
            inference = _inference_step_s(run_spec(cfg, model, task, cfg["inference"]))
            for method_name, method in cfg["methods"].items():
                built = run_spec(cfg, model, task, method)
                trained = _train(built)
                rows[method_name] = {
                    **_summary(task_name, trained["metrics"]),
                    "step_ms": 1e3 * trained["step_s"],
                    "inference_step_ms": 1e3 * inference,
                    "cost_ratio": trained["step_s"] / inference,
                    "skipped_steps": trained["skipped"],
                    "trace_bytes_per_stream": built.memory.trace_bytes // cfg["batch_size"],
                }
                print(
                    f"{model_name} / {task_name} / {method_name}: {rows[method_name]['final_loss']:.3f}",
                    flush=True,
                )
    return results


def markdown_table(document: dict) -> str:
    """The results as one markdown table, with the run's device, versions and command."""
    lines = [
        "| model | task | method | final loss | final accuracy | trace bytes / stream | ms / step"
        " | × inference |\n|---|---|---|---|---|---|---|---|\n"
    ]
    for model, tasks in document["results"].items():
        for task, methods in tasks.items():
            unit = "bits/char" if task == "char" else "nats/recall step"
            for method, r in methods.items():
                skipped = f" ({r['skipped_steps']} steps skipped)" if r["skipped_steps"] else ""
                lines.append(
                    f"| {model} | {task} | {method} | {r['final_loss']:.4g} {unit}{skipped}"
                    f" | {r['final_accuracy']:.3f} | {r['trace_bytes_per_stream']:,} | {r['step_ms']:.2f}"
                    f" | {r['cost_ratio']:.1f} |\n"
                )
    cfg = document["config"]
    lines.append(
        f"\n{cfg['steps']} steps × {cfg['batch_size']} streams, Adam {cfg['learning_rate']}; final loss and"
        f" accuracy over the last {100 // TAIL}% of the steps (online, before each update).\n"
        f"Device {document['device']}, jax {document['jax_version']}, {document['wall_s']:.0f} s in all;"
        f" command `{document['command']}`.\n"
    )
    return "".join(lines)


def _plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = document["results"]
    panels = [(model, task) for model, tasks in results.items() for task in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (model, task) in zip(axes[0], panels, strict=True):
        for method, r in results[model][task].items():
            steps = np.arange(1, len(r["curve"]) + 1) * r["curve_step"]
            ax.plot(steps, [np.nan if v is None else v for v in r["curve"]], label=method)
        ax.set_title(f"{model}, {task}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("bits/char" if task == "char" else "recall loss (nats)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(cfg: dict, out_dir: str | Path, command: str = "") -> dict:
    """Runs the benchmark and writes ``multilayer.json``, ``.md`` and ``.png`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_multilayer(cfg)
    device = jax.devices()[0]
    document = {
        "benchmark": "multilayer",
        "config": cfg,
        "results": results,
        "device": f"{device.platform}:{device.device_kind}",
        "jax_version": jax.__version__,
        "wall_s": time.perf_counter() - start,
        "command": command,
    }
    (out_dir / "multilayer.json").write_text(json.dumps(document, indent=1) + "\n")
    (out_dir / "multilayer.md").write_text(markdown_table(document))
    _plot(document, out_dir / "multilayer.png")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    try:
        cfg = load_multilayer_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/multilayer.py", args.config, *args.overrides])
    run_benchmark(cfg, args.out, command)
    print((Path(args.out) / "multilayer.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
