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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import Estimator, after
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
            # QR) running at once can deadlock XLA's intra-op pool (see rtrl_jax._src.base.after).
            trace_n = after(traces[n], previous)
            _, _, new_traces[n] = estimators[n].step(trace_n, params, carry, x, key=keys[i])
            previous = new_traces[n]
            grads[n] = estimators[n].grad(new_traces[n], params, carry_bar)
            new_traces[n] = estimators[n].observe(new_traces[n], params, carry_bar)
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
