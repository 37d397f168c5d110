"""Traces stored in a narrower floating dtype than they are computed in.

The trace of a dense estimator (exact RTRL's ``S × P`` influence blocks, KF-RTRL's and r-OK's
factors, UORO's rank-one pair, SnAp's masked entries, RFLO's and e-prop's eligibility traces, …)
is most of an online run's memory. :func:`with_trace_dtype` keeps every floating leaf of the trace
between steps in ``dtype`` (``bfloat16`` or ``float16``: half the bytes of ``float32``) and runs
the wrapped estimator's ``step`` and ``grad`` on the leaves cast back to the dtype its ``init``
gives them (``float32`` accumulation for a ``float32`` model):

    J_t = round(I_t + D_t J_{t-1}),      J_{t-1} read exactly from storage,

so one step adds a relative error of at most the dtype's unit roundoff ``u = eps / 2`` to every
stored entry (round to nearest: ``u = 2^-8`` for ``bfloat16``, ``2^-11`` for ``float16``), and
the gradient ``c_t · J_t`` read from a trace just stored is off by at most ``u Σ |c_t| |J_t|``.
Over many steps these errors are propagated by ``D_t`` like any perturbation of the trace: a
contracting ``D_t`` keeps them at the level of a few steps' roundings, an expanding one grows them
with ``J_t`` itself. ``benchmarks/trace_dtype.py`` measures the gradient error against the
``float32`` trace per estimator.

``float16`` has a narrow range (largest finite value 65504): a trace that grows beyond it
overflows to infinity; ``bfloat16`` has ``float32``'s range and fewer mantissa bits.

The wrapped trace has the same pytree structure as the original (only the dtypes of floating
leaves change), so sharding (:func:`rtrl_jax._src.base.trace_param_axes`) and memory estimates
(:func:`rtrl_jax.trace_bytes`, which reads ``init``'s shapes and dtypes) apply unchanged. Integer
and key leaves, and floating leaves no wider than ``dtype``, are stored as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtrl_jax._src.base import Estimator, no_observation

DTypeLike = Any


def _narrower(leaf_dtype: Any, storage: np.dtype) -> bool:
    return jnp.issubdtype(leaf_dtype, jnp.floating) and np.dtype(leaf_dtype).itemsize > storage.itemsize


def with_trace_dtype(estimator: Estimator, dtype: DTypeLike) -> Estimator:
    """``estimator`` with its trace stored in ``dtype`` between steps.

    Args:
      estimator: any estimator.
      dtype: a floating dtype (``jnp.bfloat16``, ``jnp.float16``, or their names); every floating
        leaf of the trace wider than it is rounded to it (to nearest) after ``init`` and ``step``.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose ``step``, ``grad``, ``observe`` and ``restart`` compute
      in the dtypes of the wrapped estimator's trace and whose stored trace has the same structure
      in ``dtype``.

    Raises:
      ValueError: ``dtype`` is not a floating dtype.

    Example:
      >>> est = with_trace_dtype(rtrl(core), jnp.bfloat16)   # or make_estimator(..., trace_dtype="bfloat16")
      >>> trace = est.init(params, carry)                    # influence blocks in bfloat16
    """
    try:
        storage = np.dtype(jnp.dtype(dtype))
    except TypeError:
        storage = None
    if storage is None or not jnp.issubdtype(storage, jnp.floating):
        raise ValueError(
            f"trace_dtype must be a floating dtype such as 'bfloat16' or 'float16', got {dtype!r}."
        )

    def store(trace):
        return jax.tree.map(
            lambda leaf: leaf.astype(storage) if _narrower(leaf.dtype, storage) else leaf, trace
        )

    def load(trace, params, carry):
        computed = jax.eval_shape(lambda p, c: estimator.init(p, c, key=jax.random.PRNGKey(0)), params, carry)
        return jax.tree.map(lambda leaf, like: leaf.astype(like.dtype), trace, computed)

    def init(params, carry, *, key=None):
        return store(estimator.init(params, carry, key=key))

    def step(trace, params, carry, x, *, key=None):
        new_carry, out, new_trace = estimator.step(load(trace, params, carry), params, carry, x, key=key)
        return new_carry, out, store(new_trace)

    def grad(trace, params, carry_bar):
        return estimator.grad(load(trace, params, carry_bar), params, carry_bar)

    def observe(trace, params, carry_bar):
        return store(estimator.observe(load(trace, params, carry_bar), params, carry_bar))

    def restart(trace, params, carry, *, key=None):
        return store(estimator.restart(load(trace, params, carry), params, carry, key=key))

    return Estimator(
        init,
        step,
        grad,
        no_observation if estimator.observe is no_observation else observe,
        None if estimator.restart is None else restart,
    )
