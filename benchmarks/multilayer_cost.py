"""What a per-layer trace costs: a 4-layer LRU stack's forward, trace, training step and BPTT.

``python benchmarks/multilayer_cost.py [--hidden 8 64] [--chunk 100] [--repeats 5] [--out DIR]``

For a stack of 4 complex LRU layers of ``hidden`` units each (``2 * hidden`` real outputs, LayerNorm
after each) behind a Dense encoder of ``2 * hidden`` features, on the copy task, one run times per
step of a batch of streams, all built by the experiment layer as in ``benchmarks/multilayer.py``:

- (a) ``forward``: the model's forward pass over a chunk (inference: a one-step buffer in place
  of a trace, no gradient);
- (b) ``forward + trace``: the same forward pass with every layer's trace updated, per-layer SnAp-1
  (exact for a diagonal recurrence; its trace holds one entry per (parameter, unit), here
  ``2P``) and per-layer dense exact RTRL (``S × P`` per layer) where ``--rtrl-max-hidden`` allows;
- (c) ``online step``: the whole online training step with per-layer SnAp-1: (b), the loss, the
  gradient across layers at the current step, Adam and the non-finite guard;
- (d) ``BPTT``: ``jax.value_and_grad`` of the chunk's summed loss through ``lax.scan`` of the
  stack as one core (:func:`rtrl_jax.bptt_value_and_grad`) with a linear readout, per step of the
  chunk (no optimizer).

Each time is the median over ``--repeats`` runs of a compiled chunk; the ratios divide by (a) of the
same width, measured in the same run. Zucchet et al. 2023 (arXiv:2305.15947) use 64 complex units per
layer in a 128-wide model: ``--hidden 64``. Outputs ``multilayer_cost.json`` and
``multilayer_cost.md`` in DIR (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from multilayer import _inference_step_s, _train, run_spec

from rtrl_jax import bptt_value_and_grad, from_linen

LAYERS = 4
COPY_LENGTH = 8
INFERENCE = ["estimator=tbptt", "estimator_options.window=1"]
TRACES = {"SnAp-1": ["estimator=snap"], "RTRL (dense)": ["estimator=rtrl"]}


def _config(chunk: int, batch_size: int, repeats: int) -> dict:
    """The shared train keys of :func:`multilayer.run_spec`: ``repeats + 1`` chunks (one compiles)."""
    return {
        "steps": chunk * (repeats + 1),
        "batch_size": batch_size,
        "learning_rate": 0.003,
        "chunk": chunk,
        "seed": 0,
    }


def _model(hidden: int) -> list[str]:
    return [
        "model.cell=lru",
        f"model.hidden={hidden}",
        f"model.layers={LAYERS}",
        "model.norm=layer",
        f"model.embedding={2 * hidden}",
    ]


TASK = {"overrides": ["task=copy", f"task_options.length={COPY_LENGTH}"], "window": 2 * COPY_LENGTH + 1}


def _median_s(fn, args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` calls after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bptt_step_s(cfg: dict, hidden: int, num_classes: int, repeats: int) -> float:
    """Per step: BPTT of the chunk's summed cross-entropy through the stack as one core."""
    built = run_spec(cfg, _model(hidden), TASK, ["estimator=tbptt", "model.traces=stack"])
    (layer,) = built.layers
    core = from_linen(built.model.cells[0], layer.input_size)
    key_params, key_head, key_x, key_y = jax.random.split(jax.random.PRNGKey(0), 4)
    core_params, carry = core.init(key_params)
    head = jax.random.normal(key_head, (layer.output_size, num_classes)) / np.sqrt(layer.output_size)
    batch, chunk = cfg["batch_size"], cfg["chunk"]
    xs = jax.random.normal(key_x, (batch, chunk, layer.input_size))
    ys = jax.random.randint(key_y, (batch, chunk), 0, num_classes)

    def step_loss(params, out, y):
        return optax.softmax_cross_entropy_with_integer_labels(out @ params[1], y)

    @jax.jit
    def bptt(params, xs, ys):
        one_stream = lambda x, y: bptt_value_and_grad(  # noqa: E731
            lambda p, h, x_t: core(p[0], h, x_t), step_loss, params, carry, x, y
        )
        return jax.vmap(one_stream)(xs, ys)

    return _median_s(bptt, ((core_params, head), xs, ys), repeats) / chunk


def measure(hidden: int, chunk: int, batch_size: int, repeats: int, rtrl_max_hidden: int) -> dict:
    """Seconds per step of (a)–(d) for the 4-layer LRU of ``hidden`` complex units; ratios to (a)."""
    cfg = _config(chunk, batch_size, repeats)
    model = _model(hidden)
    times = {"forward": _inference_step_s(run_spec(cfg, model, TASK, INFERENCE), repeats)}
    trace_bytes = {}
    for name, method in TRACES.items():
        if name.startswith("RTRL") and hidden > rtrl_max_hidden:
            continue
        built = run_spec(cfg, model, TASK, method)
        times[f"forward + {name} trace"] = _inference_step_s(built, repeats)
        trace_bytes[name] = built.memory.trace_bytes // batch_size
    snap = run_spec(cfg, model, TASK, TRACES["SnAp-1"])
    times["online step (SnAp-1)"] = _train(snap)["step_s"]
    times["BPTT"] = bptt_step_s(cfg, hidden, snap.task.num_classes, repeats)
    return {
        "step_ms": {k: 1e3 * v for k, v in times.items()},
        "ratio": {k: v / times["forward"] for k, v in times.items()},
        "trace_bytes_per_stream": trace_bytes,
    }


def markdown_table(document: dict) -> str:
    """One row per measurement, ``ms / step (× forward)`` per width."""
    results = document["results"]
    widths = list(results)
    header = " | ".join(f"{LAYERS}×LRU{h}: ms / step (× forward)" for h in widths)
    lines = [f"| per step of {document['config']['batch_size']} streams | {header} |\n"]
    lines.append("|---" * (len(widths) + 1) + "|\n")
    names = list(dict.fromkeys(name for r in results.values() for name in r["step_ms"]))
    for name in names:
        cells = [
            f"{r['step_ms'][name]:.3g} ({r['ratio'][name]:.2f})" if name in r["step_ms"] else "not run"
            for r in results.values()
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |\n")
    cfg = document["config"]
    lines.append(
        f"\nMedian of {cfg['repeats']} chunks of {cfg['chunk']} steps; device {document['device']},"
        f" jax {document['jax_version']}, load average {document['load_before']} before and"
        f" {document['load_after']} after the run; command `{document['command']}`.\n"
    )
    return "".join(lines)


def run(
    hidden: list[int], chunk: int, batch_size: int, repeats: int, rtrl_max_hidden: int, out_dir, command=""
):
    """Measures every width and writes ``multilayer_cost.json`` and ``.md`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results = {h: measure(h, chunk, batch_size, repeats, rtrl_max_hidden) for h in hidden}
    device = jax.devices()[0]
    document = {
        "benchmark": "multilayer_cost",
        "config": {"hidden": hidden, "chunk": chunk, "batch_size": batch_size, "repeats": repeats},
        "results": results,
        "device": f"{device.platform}:{device.device_kind}",
        "jax_version": jax.__version__,
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "command": command,
    }
    (out_dir / "multilayer_cost.json").write_text(json.dumps(document, indent=1) + "\n")
    (out_dir / "multilayer_cost.md").write_text(markdown_table(document))
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[8, 64], help="complex units per layer")
    parser.add_argument("--chunk", type=int, default=100, help="steps per timed chunk")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rtrl-max-hidden", type=int, default=16, help="widest layer timed with dense RTRL")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    command = " ".join(
        ["python benchmarks/multilayer_cost.py", *(argv if argv is not None else sys.argv[1:])]
    )
    run(args.hidden, args.chunk, args.batch_size, args.repeats, args.rtrl_max_hidden, args.out, command)
    print((Path(args.out) / "multilayer_cost.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
