"""Optimal Kronecker-sum approximation of RTRL (r-OK), for any Flax linen cell of Dense layers.

For every Dense kernel ``W`` (``z = a W + b``) the influence is kept as a sum of ``r`` Kronecker
products ``J_W ≈ Σ_{q≤r} u_q ⊗ A_q`` (``u_q ∈ R^in``, ``A_q ∈ R^{S×out}``). One step propagates
the ``r`` terms exactly (``A_q ← D_t A_q``) and adds the immediate term ``a_t ⊗ G_t``; the ``r+1``
terms, seen as the matrix ``C = Σ_q vec(A_q) u_qᵀ`` of rank ``k ≤ r + 1``, are then reduced to
``r`` terms by the unbiased reduction of least variance:

1. QR-factor both factor stacks, ``[vec A_q] = Q_A R_A`` and ``[u_q] = Q_u R_u``, and take the SVD
   of the small core ``R_A R_uᵀ = P Σ Vᵀ``; then ``C = L Σ Rᵀ`` with ``L = Q_A P``, ``R = Q_u V``
   and singular values ``σ_1 ≥ … ≥ σ_{r+1}``.
2. Keep the ``m`` largest triplets exactly, ``m`` the smallest with
   ``(r − m) σ_{m+1} ≤ Σ_{i>m} σ_i`` (always ``m ≤ r − 1``).
3. Replace the tail (``r + 1 − m`` values summing to ``s``) by ``q = r − m`` terms
   ``(s/q) L_tail (I − w wᵀ) R_tailᵀ``, where ``w`` is the unit vector with
   ``w_i = ±sqrt(1 − q σ_i / s)`` (independent uniform signs). ``I − w wᵀ`` is a rank-``q``
   projection and ``E[w wᵀ] = diag(1 − q σ_i/s)``, so the expectation is ``diag(σ_tail)``:
   the reduction is unbiased, deterministic on the top ``m`` directions, and exact when ``C`` has
   rank ``≤ r`` (then ``σ_{r+1} = 0`` and ``w = ±e_{r+1}``). Its variance is

       E‖C̃ − C‖²_F = (Σ_{i>m} σ_i)² / (r − m) − Σ_{i>m} σ_i²,

   the minimum over all unbiased rank-``r`` approximations (Benzing et al. 2019, Thm. 1). For
   ``r = 1`` this is ``2 σ_1 σ_2``, never above the KF-RTRL merge of the same two terms.

The reduced core ``diag(σ_kept) + (s/q)(T − w wᵀ)`` is a rank-``r`` positive semi-definite
``(r+1)×(r+1)`` matrix; its eigendecomposition ``Σ_j λ_j v_j v_jᵀ`` gives the new factors
``u_j = sqrt(λ_j) R v_j``, ``vec A_j = sqrt(λ_j) L v_j``. Parameters that are not factored Dense
kernels are tracked exactly (see :mod:`rtrl_jax._src.kronecker`). With ``joint=True`` the kernels
that feed one pre-activation share the ``r`` terms, ``u_q`` over their stacked inputs and a 1 for
each of their biases (as KF-RTRL's ``joint``).

Cost per step for an ``n``-unit cell: ``O(r n³ + r² n²)`` time, ``O(r n²)`` memory per kernel.

Reference: F. Benzing, M. M. Gauy, A. Mujika, A. Martinsson and A. Steger, "Optimal Kronecker-Sum
Approximation of Real Time Recurrent Learning", ICML 2019, arXiv:1902.03993.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rtrl_jax._src.base import Estimator, after
from rtrl_jax._src.kronecker import KroneckerState, kronecker_estimator, kronecker_layout, unsupported_reason
from rtrl_jax._src.registry import register

OKState = KroneckerState
"""The r-OK trace: a :class:`~rtrl_jax.KroneckerState` of rank r."""


def _reduced_core(sigma: jax.Array, signs: jax.Array, rank: int) -> jax.Array:
    """The ``(r+1)×(r+1)`` rank-``r`` core of the optimal unbiased reduction of ``diag(sigma)``."""
    k = sigma.shape[0]
    # Singular values at rounding level are zero: their sqrt would otherwise leak ~sqrt(eps) noise.
    sigma = jnp.where(sigma > k * jnp.finfo(sigma.dtype).eps * sigma[0], sigma, 0.0)
    index = jnp.arange(k)
    tail_sums = jnp.cumsum(sigma[::-1])[::-1]  # Σ_{i≥m} σ_i (0-based)
    feasible = ((rank - index) * sigma <= tail_sums) & (index < rank)
    m = jnp.argmax(feasible)  # the first feasible m; m = r − 1 always is
    keep = index < m
    tail = ~keep
    q = (rank - m).astype(sigma.dtype)
    s = jnp.sum(jnp.where(tail, sigma, 0.0))
    safe_s = jnp.where(s > 0, s, 1.0)
    # (s − q σ_i) / s rather than 1 − q σ_i / s: exactly 0 when σ_i carries the whole tail.
    w_squared = jnp.where(tail, jnp.clip((s - q * sigma) / safe_s, 0.0, 1.0), 0.0)
    w = signs.astype(sigma.dtype) * jnp.sqrt(w_squared)
    return jnp.diag(jnp.where(keep, sigma, 0.0)) + (s / q) * (
        jnp.diag(tail.astype(sigma.dtype)) - jnp.outer(w, w)
    )


def _combine(coefficients: jax.Array, rows: jax.Array) -> jax.Array:
    """``coefficientsᵀ @ rows`` for a handful of long rows (``(k, r)``, ``(k, ...)`` -> ``(r, ...)``),
    written as ``k`` scaled sums: one streaming pass over the rows, where a dot with inner size
    ``k`` would run far below the memory rate on CPU."""
    expand = (slice(None),) + (None,) * (rows.ndim - 1)
    terms = (coefficients[i][expand] * rows[i][None] for i in range(rows.shape[0]))
    return functools.reduce(jnp.add, terms)


def ok_reduce(u: jax.Array, a: jax.Array, signs: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """The optimal unbiased reduction of ``Σ_q u[q] ⊗ a[q]`` (``rank + 1`` terms) to ``rank`` terms.

    Args:
      u: ``(rank + 1, in)`` input-side factors.
      a: ``(rank + 1, ...)`` carry-side factors (any trailing shape, each factor taken as one vector;
        the estimator passes ``(rank + 1, out, S)``).
      signs: ``(rank + 1,)`` signs (±1, independent and uniform for unbiasedness) of the random
        unit vector that mixes the tail of the spectrum.
      rank: the number ``r`` of terms to keep.

    Returns:
      ``(u, a)`` of shapes ``(rank, in)`` and ``(rank, ...)``.
    """
    k = u.shape[0]
    q_a, r_a = jnp.linalg.qr(a.reshape(k, -1).T)  # (M, ka), (ka, k)
    # One QR after the other (serialised linear algebra: see rtrl_jax/_src/kronecker.py).
    q_u, r_u = jnp.linalg.qr(after(u.T, q_a))  # (in, ku), (ku, k)
    p, sigma, v_t = jnp.linalg.svd(r_a @ r_u.T, full_matrices=False)
    # C = (q_a p) diag(σ) (q_u v)ᵀ; the new factors are q_a and q_u times small mixing matrices.
    kept = sigma.shape[0]
    if kept <= rank:  # rank of C cannot exceed r: exact, padded with zero terms
        scale = jnp.sqrt(sigma)
        pad = ((0, 0), (0, rank - kept))
        mix_left, mix_right = jnp.pad(p * scale, pad), jnp.pad(v_t.T * scale, pad)
    else:
        eigenvalues, vectors = jnp.linalg.eigh(_reduced_core(sigma, signs, rank))
        scale = jnp.sqrt(jnp.clip(eigenvalues[1:], 0.0))  # drop the null direction
        mix_left, mix_right = (p @ vectors[:, 1:]) * scale, (v_t.T @ vectors[:, 1:]) * scale
    # Combined in the factors' own shape: a reshape of the result made XLA:CPU compute it twice
    # when the gradient read it in the same program.
    new_a = _combine(mix_left, q_a.T.reshape(k, *a.shape[1:]))
    return (q_u @ mix_right).T, new_a


def ok(core, *, rank: int = 1, joint: bool = False) -> Estimator:
    """r-OK for a Flax linen cell: ``rank`` Kronecker terms per Dense kernel, optimally reduced.

    Args:
      core: a :class:`~rtrl_jax.Core` built with :func:`~rtrl_jax.from_linen` whose cell has at
        least one ``flax.linen.Dense`` layer (``SimpleCell``, ``GRUCell``, ``LSTMCell``, ``MGUCell``
        or a user cell made of Dense layers).
      rank: the number ``r ≥ 1`` of Kronecker terms per kernel. With ``r`` at least the number of
        steps (or the kernel's input size) the trace is exact RTRL.
      joint: ``r`` terms per pre-activation instead of per kernel: the kernels whose outputs are
        summed share them with their biases (:func:`rtrl_jax._src.kronecker.kronecker_layout`).

    Returns:
      An :class:`~rtrl_jax.Estimator` with a :class:`~rtrl_jax.KroneckerState` trace of rank
      ``rank``; ``step`` needs ``key=``.

    Raises:
      ValueError: for ``rank < 1``, or if the core has no linen cell or the cell has no Dense
        kernel (the message names the estimators that can serve it).

    Example:
      >>> est = ok(core, rank=2)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x, key=key)
      >>> grads = est.grad(trace, params, carry_bar)
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"OK rank must be a positive integer, got {rank!r}.")

    def reduce(u, a, key):
        return ok_reduce(u, a, jax.random.rademacher(key, (rank + 1,), dtype=u.dtype), rank)

    return kronecker_estimator(core, rank=rank, reduce=reduce, name=f"{rank}-OK", serialise=True, joint=joint)


def ok_is_exact(core, *, rank: int = 1, joint: bool = False) -> bool:
    """Whether ``ok(core, rank=rank, joint=joint)`` is exact RTRL: ``rank`` reaches every factor's
    input size (a kernel's, or a group's stacked input with its biases), the largest rank its
    influence ``Σ_q vec(A_q) u_qᵀ`` can have, so no reduction drops anything."""
    return all(rank >= factor.in_size for factor in kronecker_layout(core, joint=joint).factors)


register(
    "ok",
    ok,
    summary="r-OK: r Kronecker terms per Dense kernel, optimal unbiased reduction",
    needs_key=True,
    unsupported_reason=unsupported_reason,
    exact_for=ok_is_exact,
)
