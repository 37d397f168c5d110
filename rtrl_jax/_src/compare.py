"""Gradient quality: estimators next to an exact-RTRL shadow on one shared trajectory.

Every estimator in a comparison sees the same stream, the same parameters and the same carries. At
each step ``t`` each one turns the same loss cotangent ``c_t`` into its gradient ``g̃_t``, and the
exact-RTRL shadow gives ``g_t = c_t · J_t``. The parameters are frozen (``train_with=None``), or
follow plain SGD on the gradient of one of the compared estimators (``train_with=name``), in which
case every estimator and the shadow track the parameters that estimator produces.

Measures, for a window of ``w`` steps (``G = Σ_{t in window} g_t``, summed over consecutive
non-overlapping windows; ``w = 1`` is per step):

- alignment ``cos(G̃, G)``; exact RTRL against itself gives 1;
- relative error ``‖G̃ − G‖ / ‖G‖``;
- over ``K`` keys (the estimator's random signs; ``jax.vmap`` over the keys), per step:
  relative variance ``E_k‖g̃_k − ḡ‖² / ‖g‖²`` and relative squared bias ``‖ḡ − g‖² / ‖g‖²``
  with the ``tr Σ̂ / K`` share of the sampling noise taken out (so about 0 for an unbiased estimator;
  it can dip below 0 by noise).

Steps and windows where the exact gradient is zero (no loss on them) are left out of the averages.

References: Marschall, Cho & Savin 2020 (alignment of approximate gradients with the exact one,
arXiv:1907.02649); Benzing et al. 2019 (variance against bias, arXiv:1902.03993).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.config import ModelConfig
from rtrl_jax._src.kronecker import after
from rtrl_jax._src.online import carry_cotangent

_TINY = 1e-30


class GradientTrajectory(NamedTuple):
    """Per-step flat gradients on one shared trajectory.

    Attributes:
      grads: ``{name: (T, P)}`` each estimator's per-step gradient.
      exact: ``(T, P)`` the exact-RTRL shadow's per-step gradient.
      loss: ``(T,)`` the step losses.
    """

    grads: dict[str, jax.Array]
    exact: jax.Array
    loss: jax.Array


def gradient_trajectory(
    core: Any,
    estimators: Mapping[str, Estimator],
    exact: Estimator,
    params: Any,
    carry: Any,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    key: jax.Array,
    train_with: str | None = None,
    learning_rate: float = 0.0,
) -> GradientTrajectory:
    """Runs ``estimators`` and the exact shadow ``exact`` side by side over one stream.

    Args:
      core: a :class:`~rtrl_jax.Core` (its ``output`` maps the carry to the step output).
      estimators: ``{name: estimator}`` built for ``core``.
      exact: the exact-RTRL estimator (``rtrl(core)``), the reference.
      params: the core's parameters at the start.
      carry: the initial carry.
      inputs: the stream's inputs, leading axis time ``T``.
      targets: any pytree with leading axis ``T``, handed to ``loss_fn`` step by step.
      loss_fn: ``(out_t, target_t) -> scalar`` step loss.
      key: the random key of the run (each estimator gets its own stream of keys).
      train_with: ``None`` for frozen parameters, or a name in ``estimators`` (or ``"exact"``)
        whose gradient drives SGD on the parameters.
      learning_rate: the SGD step size when ``train_with`` is set.

    Returns:
      A :class:`GradientTrajectory`. Pure; jit it (estimators closed over).
    """
    names = list(estimators)
    if train_with is not None and train_with not in (*names, "exact"):
        raise ValueError(f"train_with={train_with!r} is not one of {names + ['exact']}.")
    init_keys = jax.random.split(jax.random.fold_in(key, 0), len(names) + 1)
    traces = {n: estimators[n].init(params, carry, key=init_keys[i]) for i, n in enumerate(names)}
    exact_trace = exact.init(params, carry, key=init_keys[-1])
    num_steps = jax.tree.leaves(inputs)[0].shape[0]
    step_keys = jax.random.split(jax.random.fold_in(key, 1), num_steps)

    def body(state, step):
        params, carry, traces, exact_trace = state
        x, target, step_key = step
        new_carry, out, exact_trace = exact.step(exact_trace, params, carry, x, key=None)
        loss, out_bar = jax.value_and_grad(loss_fn)(out, target)
        carry_bar = carry_cotangent(core, new_carry, out_bar)
        exact_grad = exact.grad(exact_trace, params, carry_bar)
        keys = jax.random.split(step_key, len(names))
        new_traces, grads, previous = {}, {}, ()
        for i, n in enumerate(names):
            # One estimator after the other: on CPU, two estimators' batched LAPACK calls (r-OK's
            # QR) running at once can deadlock XLA's intra-op pool (see rtrl_jax/_src/kronecker.py).
            trace_n = after(traces[n], previous)
            _, _, new_traces[n] = estimators[n].step(trace_n, params, carry, x, key=keys[i])
            previous = new_traces[n]
            grads[n] = estimators[n].grad(new_traces[n], params, carry_bar)
        if train_with is not None:
            driver = exact_grad if train_with == "exact" else grads[train_with]
            params = jax.tree.map(lambda p, g: p - learning_rate * g, params, driver)
        flat = {n: ravel_pytree(g)[0] for n, g in grads.items()}
        return (params, new_carry, new_traces, exact_trace), (flat, ravel_pytree(exact_grad)[0], loss)

    _, (grads, exact_grads, losses) = jax.lax.scan(
        body, (params, carry, traces, exact_trace), (inputs, targets, step_keys)
    )
    return GradientTrajectory(grads, exact_grads, losses)


def window_sums(grads: jax.Array, window: int) -> jax.Array:
    """``(..., T, P) -> (..., T // w, P)``: gradients summed over consecutive windows of ``w`` steps."""
    steps = grads.shape[-2] // window * window
    trimmed = grads[..., :steps, :]
    return trimmed.reshape(*grads.shape[:-2], steps // window, window, grads.shape[-1]).sum(axis=-2)


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def gradient_alignment(estimate: jax.Array, exact: jax.Array, window: int = 1) -> dict[str, jax.Array]:
    """Cosine alignment and relative error of ``estimate`` against ``exact`` over windows.

    Args:
      estimate: ``(..., T, P)`` per-step gradients (leading axes, e.g. keys, are averaged over).
      exact: ``(..., T, P)`` the exact per-step gradients (broadcast against ``estimate``).
      window: steps per window (1: per step).

    Returns:
      ``{"cosine": mean cos, "rel_error": mean ‖Ĝ − G‖/‖G‖, "cosine_per_window": (T // w,) cos
      averaged over the leading axes}``, over windows whose exact sum is not zero.
    """
    est, ref = window_sums(estimate, window), window_sums(exact, window)
    est, ref = jnp.broadcast_arrays(est, ref)
    ref_norm = jnp.linalg.norm(ref, axis=-1)
    est_norm = jnp.linalg.norm(est, axis=-1)
    valid = ref_norm > _TINY
    cos = jnp.sum(est * ref, axis=-1) / jnp.maximum(est_norm * ref_norm, _TINY)
    rel = jnp.linalg.norm(est - ref, axis=-1) / jnp.maximum(ref_norm, _TINY)
    lead = tuple(range(cos.ndim - 1))
    per_window = jnp.sum(jnp.where(valid, cos, 0.0), axis=lead) / jnp.maximum(jnp.sum(valid, axis=lead), 1)
    return {
        "cosine": _masked_mean(cos, valid),
        "rel_error": _masked_mean(rel, valid),
        "cosine_per_window": per_window,
    }


def gradient_bias_variance(samples: jax.Array, exact: jax.Array) -> dict[str, jax.Array]:
    """Relative squared bias and variance of per-step gradients over keys.

    Works on the errors ``e_k = g̃_k − g_k`` so that each key may have its own trajectory (parameters
    trained by a stochastic estimator); with frozen parameters ``g_k = g`` for every key and these
    are the bias and variance of ``g̃`` itself.

    Args:
      samples: ``(K, T, P)`` gradients of one estimator for ``K`` keys (``K ≥ 2``).
      exact: ``(K, T, P)`` the exact gradients of each key's trajectory, or ``(T, P)`` shared.

    Returns:
      ``{"bias2": ‖ē‖² − tr Σ̂_e / K, "variance": E_k‖e_k − ē‖²}`` per step, each relative to the
      mean ``‖g_t‖²`` and averaged over the steps where it is not zero.
    """
    num_keys = samples.shape[0]
    if num_keys < 2:
        raise ValueError(f"bias and variance need at least 2 keys, got {num_keys}.")
    exact = jnp.broadcast_to(exact, samples.shape)
    errors = samples - exact
    ref2 = jnp.mean(jnp.sum(exact**2, axis=-1), axis=0)
    valid = ref2 > _TINY
    mean = errors.mean(axis=0)
    trace_cov = jnp.sum(jnp.var(errors, axis=0, ddof=1), axis=-1)
    variance = jnp.sum(jnp.mean((errors - mean) ** 2, axis=0), axis=-1)
    bias2 = jnp.sum(mean**2, axis=-1) - trace_cov / num_keys
    scale = jnp.maximum(ref2, _TINY)
    return {"bias2": _masked_mean(bias2 / scale, valid), "variance": _masked_mean(variance / scale, valid)}


class Comparison(NamedTuple):
    """The result of :func:`compare_gradients`.

    Attributes:
      summary: ``{name: {"cosine@w": ..., "rel_error@w": ..., "bias2": ..., "variance": ...}}``
        as Python floats.
      curves: ``{name: {w: (T // w,) cosine per window, averaged over keys}}`` as NumPy arrays.
      loss: ``(K, T)`` step losses of each key's trajectory.
      trajectory: the raw :class:`GradientTrajectory` with a leading key axis.
    """

    summary: dict[str, dict[str, float]]
    curves: dict[str, dict[int, np.ndarray]]
    loss: np.ndarray
    trajectory: GradientTrajectory


def compare_gradients(
    core: Any,
    estimators: Mapping[str, Estimator],
    exact: Estimator,
    params: Any,
    carry: Any,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    keys: jax.Array,
    windows: Sequence[int] = (1, 10),
    train_with: str | None = None,
    learning_rate: float = 0.0,
) -> Comparison:
    """Gradient quality of ``estimators`` against exact RTRL, over ``keys`` (vmapped).

    Runs :func:`gradient_trajectory` once per key (``jax.vmap``, one ``jit``) and summarises it
    with :func:`gradient_alignment` for each window of ``windows`` and :func:`gradient_bias_variance`.

    Example::

        core = rtrl_jax.from_linen(nn.SimpleCell(16), 2)
        params, carry = core.init(key)
        result = compare_gradients(core, {"uoro": uoro(core)}, rtrl(core), params, carry,
                                   xs, ys, loss_fn, keys=jax.random.split(key, 8))
        result.summary["uoro"]["cosine@10"]

    Returns:
      A :class:`Comparison`.
    """
    for w in windows:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"windows must be positive integers, got {w!r}.")

    def one(key):
        return gradient_trajectory(
            core,
            estimators,
            exact,
            params,
            carry,
            inputs,
            targets,
            loss_fn,
            key=key,
            train_with=train_with,
            learning_rate=learning_rate,
        )

    @jax.jit
    def run(keys):
        traj = jax.vmap(one)(keys)
        stats = {}
        for name, grads in traj.grads.items():
            entry = {}
            for w in windows:
                a = gradient_alignment(grads, traj.exact, w)
                entry[f"cosine@{w}"] = a["cosine"]
                entry[f"rel_error@{w}"] = a["rel_error"]
                entry[f"curve@{w}"] = a["cosine_per_window"]
            if keys.shape[0] >= 2:
                entry.update(gradient_bias_variance(grads, traj.exact))
            stats[name] = entry
        return traj, stats

    traj, stats = run(keys)
    summary, curves = {}, {}
    for name in estimators:  # the caller's order (pytree dicts come back sorted)
        entry = stats[name]
        summary[name] = {k: float(v) for k, v in entry.items() if not k.startswith("curve@")}
        curves[name] = {w: np.asarray(entry[f"curve@{w}"]) for w in windows}
    return Comparison(summary, curves, np.asarray(traj.loss), traj)


def markdown_table(summary: Mapping[str, Mapping[str, float]], windows: Sequence[int]) -> str:
    """The summary of a :class:`Comparison` as a markdown table, one row per estimator."""
    cols = [f"cosine@{w}" for w in windows] + [f"rel_error@{w}" for w in windows] + ["bias2", "variance"]
    lines = ["| estimator | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, entry in summary.items():
        cells = [f"{entry[c]:.4g}" if c in entry else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: Comparison, windows: Sequence[int], path: Any) -> None:
    """Writes a PNG: per-window alignment along the run, and mean alignment against the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w0 = windows[0]
    for name, curves in comparison.curves.items():
        curve = curves[w0]
        smooth = max(1, curve.shape[0] // 50)
        kernel = np.ones(smooth) / smooth
        smoothed = np.convolve(curve, kernel, mode="valid")
        ax1.plot((np.arange(smoothed.shape[0]) + (smooth - 1) / 2) * w0, smoothed, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"cos(estimate, exact), window {w0}")
    ax1.set_title("alignment along the trajectory")
    ax1.legend(fontsize=8)
    for name, entry in comparison.summary.items():
        ax2.plot(list(windows), [entry[f"cosine@{w}"] for w in windows], marker="o", label=name)
    ax2.set_xscale("log")
    ax2.set_xlabel("window (steps summed)")
    ax2.set_ylabel("mean cosine with exact RTRL")
    ax2.set_title("alignment against the window")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the `rtrl-jax compare CONFIG` job -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """A gradient-quality comparison (``rtrl-jax compare``).

    Attributes:
      estimators: ``{label: options}``; the label is the registry name unless the options hold
        ``estimator: name`` (e.g. ``ok2: {estimator: ok, rank: 2}``).
      task: a task name; its stream is the shared trajectory (the readout head is random and frozen).
      task_options: keyword options of the task.
      model: the cell.
      steps: length of the trajectory.
      num_keys: random keys (estimator noise) vmapped over; bias and variance need ``≥ 2``.
      windows: window sizes for the windowed alignment.
      train_with: ``""`` for frozen parameters, or a label (or ``exact``) whose gradient drives SGD.
      learning_rate: the SGD step size when ``train_with`` is set.
      seed: parameters, head and stream.
    """

    estimators: dict = dataclasses.field(
        default_factory=lambda: {"uoro": {}, "kf": {}, "ok": {"rank": 2}, "tbptt": {"window": 10}}
    )
    task: str = "add"
    task_options: dict = dataclasses.field(default_factory=dict)
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(cell="simple", hidden=16))
    steps: int = 500
    num_keys: int = 8
    windows: list = dataclasses.field(default_factory=lambda: [1, 10, 100])
    train_with: str = ""
    learning_rate: float = 0.0
    seed: int = 0


def load_compare_config(path: Any = None, overrides: Sequence[str] = ()) -> Any:
    """Reads a YAML comparison config, applies dotted ``key=value`` overrides, validates it."""
    from pathlib import Path

    import yaml

    from rtrl_jax._src import config as cfg

    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise cfg.ConfigError(f"config file {str(path)!r} does not exist.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise cfg.ConfigError(f"config file {str(path)!r} must hold a mapping at the top level.")
    for text in overrides:
        key, value = cfg.parse_override(text)
        cfg._set(data, key, value)
    model = data.setdefault("model", {})
    if isinstance(model, dict):  # the comparison's own defaults for keys the file leaves out
        model.setdefault("cell", "simple")
        model.setdefault("hidden", 16)
    config = cfg._build(CompareConfig, data, "")
    if config.steps < 1 or config.num_keys < 1:
        raise cfg.ConfigError("steps and num_keys must be >= 1.")
    if not config.estimators:
        raise cfg.ConfigError("estimators: give at least one estimator.")
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in config.windows):
        raise cfg.ConfigError(f"windows: expected positive integers, got {config.windows!r}.")
    if config.train_with and config.train_with not in (*config.estimators, "exact"):
        raise cfg.ConfigError(
            f"train_with: {config.train_with!r} is not one of {[*config.estimators, 'exact']}."
        )
    return config


def _build_estimators(config: Any, core: Any) -> dict[str, Estimator]:
    from rtrl_jax._src.config import ConfigError
    from rtrl_jax._src.registry import make_estimator

    built = {}
    for label, options in config.estimators.items():
        options = dict(options or {})
        name = options.pop("estimator", label)
        try:
            built[label] = make_estimator(name, core, **options)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"estimators.{label}: {error}") from None
    return built


def run_compare(config: Any, out_dir: Any) -> dict[str, Any]:
    """Runs the comparison of ``config`` and writes ``compare.json``, ``compare.md``, ``compare.png``.

    Returns:
      The JSON document (config, device, versions, summary, per-window curves).
    """
    import json
    import time
    from pathlib import Path

    from rtrl_jax._src import models, tasks
    from rtrl_jax._src.config import RunConfig
    from rtrl_jax._src.rtrl import rtrl
    from rtrl_jax._src.trainer import linear_head, softmax_cross_entropy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = jnp.dtype(config.model.dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    task = tasks.TASKS[config.task](**config.task_options)
    core = models.build_core(RunConfig(model=config.model), task.input_size)
    estimators = _build_estimators(config, core)
    key_core, key_head, key_data, key_run = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    params, carry = core.init(key_core, dtype)
    head = linear_head()
    head_params = head.init(key_head, config.model.hidden, task.num_classes, dtype)
    stream = task.sample(key_data, config.steps)

    def loss_fn(out, target):
        probs, weight = target
        return weight * softmax_cross_entropy(head.apply(head_params, out), probs)

    start = time.perf_counter()
    result = compare_gradients(
        core,
        estimators,
        rtrl(core),
        params,
        carry,
        stream.inputs.astype(dtype),
        (stream.targets.astype(dtype), stream.mask.astype(dtype)),
        loss_fn,
        keys=jax.random.split(key_run, config.num_keys),
        windows=tuple(config.windows),
        train_with=config.train_with or None,
        learning_rate=config.learning_rate,
    )
    device = jax.devices()[0]
    document = {
        "config": dataclasses.asdict(config),
        "num_params": core.num_params,
        "device": f"{device.platform}:{device.device_kind}",
        "jax_version": jax.__version__,
        "wall_s": time.perf_counter() - start,
        "summary": result.summary,
        "curves": {n: {str(w): c.tolist() for w, c in cs.items()} for n, cs in result.curves.items()},
        "mean_loss": float(result.loss.mean()),
    }
    (out_dir / "compare.json").write_text(json.dumps(document, indent=1) + "\n")
    header = (
        f"Gradient quality against exact RTRL: task {task.name}, cell {config.model.cell} "
        f"n={config.model.hidden} (P={core.num_params}), {config.steps} steps, {config.num_keys} keys, "
        f"{'frozen parameters' if not config.train_with else 'trained by ' + config.train_with}; "
        f"{document['device']}, jax {jax.__version__}.\n\n"
    )
    (out_dir / "compare.md").write_text(header + markdown_table(result.summary, config.windows))
    plot_comparison(result, tuple(config.windows), out_dir / "compare.png")
    return document
