"""The estimator interface shared by every online gradient method.

Every online gradient method for a recurrent core ``h_t = F(h_{t-1}, x_t; θ)`` tracks an
approximation of the influence matrix ``J_t = dh_t/dθ`` through the recursion

    J_t = I_t + D_t J_{t-1},     I_t = ∂F/∂θ (immediate),   D_t = ∂F/∂h (dynamics),

and turns the cotangent ``c_t = ∂L_t/∂h_t`` of a per-step loss into the gradient estimate
``c_t · J_t``. The methods differ only in how ``J`` is stored and propagated, so they all share one
shape, a :class:`Estimator` made of pure functions (in the style of
``optax.GradientTransformation``):

- ``init(params, carry, *, key=None) -> trace``
- ``step(trace, params, carry, x, *, key=None) -> (carry, out, trace)`` advances the core and the
  trace by one step;
- ``grad(trace, params, carry_bar) -> params_bar`` contracts a cotangent on the carry held by
  ``trace`` with the trace: the estimate of ``carry_bar · dh_t/dθ``;
- ``observe(trace, params, carry_bar) -> trace`` shows the trace the cotangent ``c_t`` of the step's
  loss once it is known, for estimators that learn from it (DNI's synthetic gradient); the
  default returns the trace unchanged. A training loop calls it after ``grad`` with the same
  cotangent: ``step``, then ``grad`` and ``observe`` of ``c_t``, then the next ``step``;
- ``restart(trace, params, carry, *, key=None) -> trace`` is the trace for a stream whose episode
  starts again from ``carry``, for estimators whose trace holds parts learned across episodes
  (DNI's synthetic-gradient map, KeRNL's sensitivity and kernel): it keeps those and starts the
  per-episode parts again as ``init`` does. Without it a restart is ``init``. Loops restart a
  trace with :func:`restart_trace`.

Traces are pytrees for one stream; batches come from ``jax.vmap``. Random keys are keyword-only and
nothing is jitted implicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

Params = Any
Carry = Any
Trace = Any
Input = Any
Output = Any
PRNGKey = jax.Array


class CoreFn(Protocol):
    """A recurrent core: a pure step function ``(params, carry, x) -> (carry, out)``."""

    def __call__(self, params: Params, carry: Carry, x: Input) -> tuple[Carry, Output]: ...


class InitFn(Protocol):
    def __call__(self, params: Params, carry: Carry, *, key: PRNGKey | None = None) -> Trace: ...


class StepFn(Protocol):
    def __call__(
        self,
        trace: Trace,
        params: Params,
        carry: Carry,
        x: Input,
        *,
        key: PRNGKey | None = None,
    ) -> tuple[Carry, Output, Trace]: ...


class GradFn(Protocol):
    def __call__(self, trace: Trace, params: Params, carry_bar: Carry) -> Params: ...


class ObserveFn(Protocol):
    def __call__(self, trace: Trace, params: Params, carry_bar: Carry) -> Trace: ...


class RestartFn(Protocol):
    def __call__(
        self, trace: Trace, params: Params, carry: Carry, *, key: PRNGKey | None = None
    ) -> Trace: ...


def no_observation(trace: Trace, params: Params, carry_bar: Carry) -> Trace:
    """The ``observe`` of an estimator that learns nothing from the loss: the trace unchanged."""
    del params, carry_bar
    return trace


class Estimator(NamedTuple):
    """An online gradient estimator: pure functions over a trace pytree.

    Attributes:
      init: ``(params, carry, *, key=None) -> trace``, the trace for a fresh stream (``J_0 = 0``).
      step: ``(trace, params, carry, x, *, key=None) -> (carry, out, trace)``, one step of the
        core and of the trace.
      grad: ``(trace, params, carry_bar) -> params_bar``, the estimate of ``carry_bar · J_t`` where
        ``J_t`` is the influence of the parameters on the carry that ``trace`` belongs to.
      observe: ``(trace, params, carry_bar) -> trace``, the trace after seeing the cotangent
        ``carry_bar = ∂L_t/∂h_t`` of the step's loss (called after ``grad`` with the same
        cotangent, before the next ``step``); :func:`no_observation` by default. Only estimators
        whose trace learns from the loss itself need it: the loss reaches an estimator nowhere
        else, since ``grad`` is a pure contraction (:func:`influence_matrix` calls it with every
        basis cotangent).
      restart: ``(trace, params, carry, *, key=None) -> trace``, the trace for a stream whose
        episode starts again from ``carry``, given its last ``trace``: the parts the trace has
        learned (from the loss or from perturbations) kept, the per-episode parts (those that
        depend on the carries of the episode) as ``init`` makes them. ``None`` (the default) for
        estimators whose trace learns nothing, for which a restart is ``init``. Call it through
        :func:`restart_trace`.
    """

    init: InitFn
    step: StepFn
    grad: GradFn
    observe: ObserveFn = no_observation
    restart: RestartFn | None = None


def restart_trace(
    estimator: Estimator, trace: Trace, params: Params, carry: Carry, *, key: PRNGKey | None = None
) -> Trace:
    """The trace of a stream whose episode starts again from ``carry``, after ``trace``.

    ``estimator.restart`` where the estimator has one (its learned parts survive the episode
    boundary), else ``estimator.init(params, carry, key=key)``. ``key`` is the one ``init`` would
    get.
    """
    if estimator.restart is None:
        return estimator.init(params, carry, key=key)
    return estimator.restart(trace, params, carry, key=key)


class FlatCore(NamedTuple):
    """A core seen as a map between flat vectors, for estimators that store dense matrices.

    Attributes:
      apply: ``(flat_params, flat_carry, x) -> (flat_carry, out)``.
      unravel_params: flat vector -> params pytree.
      unravel_carry: flat vector -> carry pytree.
    """

    apply: Callable[[jax.Array, jax.Array, Input], tuple[jax.Array, Output]]
    unravel_params: Callable[[jax.Array], Params]
    unravel_carry: Callable[[jax.Array], Carry]


def flatten_core(core: CoreFn, params: Params, carry: Carry) -> FlatCore:
    """Views ``core`` as a function of the flat parameter and carry vectors.

    The unravel functions are built from ``params`` and ``carry`` (only their structure, shapes and
    dtypes are used), so this can be called inside a jitted function.
    """
    _, unravel_params = ravel_pytree(params)
    _, unravel_carry = ravel_pytree(carry)

    def apply(flat_params, flat_carry, x):
        new_carry, out = core(unravel_params(flat_params), unravel_carry(flat_carry), x)
        return ravel_pytree(new_carry)[0], out

    return FlatCore(apply, unravel_params, unravel_carry)


def trace_param_axes(trace: Trace) -> Any:
    """For each leaf of ``trace``, the axis that runs over parameters, or ``None`` for a trace
    without one.

    A trace whose leaves hold one row per parameter (exact RTRL's influence blocks) says so with a
    ``param_axes()`` method on its state type returning, per leaf, the index of that axis (for one
    stream). Sharding (:mod:`rtrl_jax._src.sharding`) splits those axes across devices; every other
    trace is split by stream only.
    """
    param_axes = getattr(trace, "param_axes", None)
    return None if param_axes is None else param_axes()


def tree_size(tree: Any) -> int:
    """The number of scalars in a pytree of arrays."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(tree))


def influence_matrix(estimator: Estimator, trace: Trace, params: Params, carry: Carry) -> jax.Array:
    """The dense ``S × P`` influence matrix that ``trace`` stands for.

    Built from ``estimator.grad`` alone, by contracting the trace with each basis cotangent of the
    carry, so it serves every estimator (for research and tests; it costs ``S`` calls of ``grad``).

    Args:
      estimator: the estimator that produced ``trace``.
      trace: a trace of ``estimator``.
      params: the parameters (their structure is used).
      carry: a carry of the core (its structure is used).

    Returns:
      ``J`` with ``J[i, j] = d carry_i / d params_j`` for the flattened carry and parameters.
    """
    flat_carry, unravel_carry = ravel_pytree(carry)
    basis = jnp.eye(flat_carry.size, dtype=flat_carry.dtype)

    def row(cotangent):
        return ravel_pytree(estimator.grad(trace, params, unravel_carry(cotangent)))[0]

    return jax.vmap(row)(basis)


def after(tree: Any, dependencies: Any, *, every_backend: bool = False) -> Any:
    """``tree`` unchanged, but computed only once ``dependencies`` are, when compiled for CPU.

    Serialises linear algebra that must not run concurrently on XLA:CPU: jaxlib's batched LAPACK
    kernels split their batch over XLA's intra-op pool and block until the pieces are done, so two
    started at once on a two-thread pool can each hold a thread and wait for the other (see
    :mod:`rtrl_jax._src.kronecker`). ``jax.lax.optimization_barrier`` is not enough there: XLA:CPU
    drops it before scheduling, so the order is made a data dependency. Every leaf of ``tree``
    passes through a select whose predicate reads one entry ``t`` of every dependency and is never
    true (``isnan(t) & isinf(t)``), which XLA cannot fold away; the result is ``tree`` bit for bit
    whatever ``t`` holds (a non-finite dependency leaves it untouched).

    The choice is made per platform when the function is lowered
    (``jax.lax.platform_dependent``): GPU and TPU kernels do not share a blocking host pool, so
    there ``tree`` is returned with no dependency and no extra pass over it. With
    ``every_backend=True`` the dependency is made on every platform: for an order that bounds
    memory rather than avoids a deadlock (exact RTRL's block updates, one product alive at a time).
    """
    leaves = [jnp.ravel(leaf)[:1] for leaf in jax.tree.leaves(dependencies)]
    if not leaves:
        return tree
    token = jnp.concatenate([leaf.astype(jnp.float32) for leaf in leaves])

    def serialised(tree, token):
        never = jnp.any(jnp.isnan(token) & jnp.isinf(token))
        return jax.tree.map(lambda x: jnp.where(never, jnp.zeros_like(x), x), tree)

    if every_backend:
        return serialised(tree, token)
    return jax.lax.platform_dependent(tree, token, cpu=serialised, default=lambda tree, token: tree)
