"""The estimator interface shared by every online gradient method.

Every online gradient method for a recurrent core ``h_t = F(h_{t-1}, x_t; θ)`` tracks an
approximation of the influence matrix ``J_t = dh_t/dθ`` through the recursion

    J_t = I_t + D_t J_{t-1},     I_t = ∂F/∂θ (immediate),   D_t = ∂F/∂h (dynamics),

and turns the cotangent ``c_t = ∂L_t/∂h_t`` of a per-step loss into the gradient estimate
``c_t · J_t``. The methods differ only in how ``J`` is stored and propagated, so they all share one
shape, a :class:`Estimator` made of three pure functions (in the style of
``optax.GradientTransformation``):

- ``init(params, carry, *, key=None) -> trace``
- ``step(trace, params, carry, x, *, key=None) -> (carry, out, trace)`` advances the core and the
  trace by one step;
- ``grad(trace, params, carry_bar) -> params_bar`` contracts a cotangent on the carry held by
  ``trace`` with the trace: the estimate of ``carry_bar · dh_t/dθ``.

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


class Estimator(NamedTuple):
    """An online gradient estimator: three pure functions over a trace pytree.

    Attributes:
      init: ``(params, carry, *, key=None) -> trace``, the trace for a fresh stream (``J_0 = 0``).
      step: ``(trace, params, carry, x, *, key=None) -> (carry, out, trace)``, one step of the
        core and of the trace.
      grad: ``(trace, params, carry_bar) -> params_bar``, the estimate of ``carry_bar · J_t`` where
        ``J_t`` is the influence of the parameters on the carry that ``trace`` belongs to.
    """

    init: InitFn
    step: StepFn
    grad: GradFn


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


def after(tree: Any, dependencies: Any) -> Any:
    """``tree`` unchanged, but computed only once ``dependencies`` are.

    Serialises linear algebra that must not run concurrently: on CPU, jaxlib's batched LAPACK
    kernels split their batch over XLA's intra-op pool and block until the pieces are done, so two
    started at once on a two-thread pool can each hold a thread and wait for the other (see
    :mod:`rtrl_jax._src.kronecker`). The result reads one entry
    of every dependency (``jnp.where(isfinite(token), x, x + token)``, which XLA cannot fold away).
    ``jax.lax.optimization_barrier`` is not enough: XLA:CPU drops it before scheduling, so two
    independent LAPACK calls may still run at once."""
    leaves = [jnp.ravel(leaf)[:1].sum() for leaf in jax.tree.leaves(dependencies)]
    if not leaves:
        return tree
    token = sum(leaves[1:], leaves[0])
    return jax.tree.map(lambda x: jnp.where(jnp.isfinite(token), x, (x + token).astype(x.dtype)), tree)
