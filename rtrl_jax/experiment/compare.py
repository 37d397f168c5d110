"""The ``rtrl-jax compare`` job: gradient quality of a spec's estimators, as JSON, markdown and PNG.

The measures are the library's (:func:`rtrl_jax.compare_gradients`); this module runs them on what
a :class:`~rtrl_jax.experiment.CompareConfig` builds and writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from rtrl_jax._src.compare import compare_gradients
from rtrl_jax._src.trainer import softmax_cross_entropy
from rtrl_jax.experiment.build import CompareJob, build
from rtrl_jax.experiment.plot import plot_comparison
from rtrl_jax.experiment.spec import CompareConfig


def markdown_table(summary: Mapping[str, Mapping[str, float]], windows: Sequence[int]) -> str:
    """The summary of a :class:`~rtrl_jax.Comparison` as a markdown table, one row per estimator."""
    cols = [f"cosine@{w}" for w in windows] + [f"rel_error@{w}" for w in windows] + ["bias2", "variance"]
    lines = ["| estimator | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, entry in summary.items():
        cells = [f"{entry[c]:.4g}" if c in entry else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_compare(job: CompareJob | CompareConfig, out_dir: str | Path) -> dict[str, Any]:
    """Runs a comparison and writes ``compare.json``, ``compare.md`` and ``compare.png`` to ``out_dir``.

    Args:
      job: a built :class:`~rtrl_jax.experiment.CompareJob`, or a :class:`CompareConfig` to build.
      out_dir: the output folder (created).

    Returns:
      The JSON document (config, device, versions, summary, per-window curves).

    Raises:
      ConfigError: a :class:`CompareConfig` that does not build.
    """
    if not isinstance(job, CompareJob):
        job = build(job)
    config, dtype = job.spec, job.dtype
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def loss_fn(out, target):
        probs, weight = target
        return weight * softmax_cross_entropy(job.head.apply(job.head_params, out), probs)

    start = time.perf_counter()
    result = compare_gradients(
        job.core,
        job.estimators,
        job.exact,
        job.params,
        job.carry,
        job.stream.inputs.astype(dtype),
        (job.stream.targets.astype(dtype), job.stream.mask.astype(dtype)),
        loss_fn,
        keys=jax.random.split(job.key, config.num_keys),
        windows=tuple(config.windows),
        train_with=config.train_with or None,
        learning_rate=config.learning_rate,
    )
    device = jax.devices()[0]
    document = {
        "config": dataclasses.asdict(config),
        "num_params": job.core.num_params,
        "device": f"{device.platform}:{device.device_kind}",
        "jax_version": jax.__version__,
        "wall_s": time.perf_counter() - start,
        "summary": result.summary,
        "curves": {n: {str(w): c.tolist() for w, c in cs.items()} for n, cs in result.curves.items()},
        "mean_loss": float(result.loss.mean()),
    }
    (out_dir / "compare.json").write_text(json.dumps(document, indent=1) + "\n")
    header = (
        f"Gradient quality against exact RTRL: task {job.task.name}, cell {config.model.cell} "
        f"n={config.model.hidden} (P={job.core.num_params}), {config.steps} steps, {config.num_keys} keys, "
        f"{'frozen parameters' if not config.train_with else 'trained by ' + config.train_with}; "
        f"{document['device']}, jax {jax.__version__}.\n\n"
    )
    (out_dir / "compare.md").write_text(header + markdown_table(result.summary, config.windows))
    plot_comparison(result, tuple(config.windows), out_dir / "compare.png")
    return document
