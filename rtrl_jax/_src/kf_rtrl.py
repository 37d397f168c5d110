"""Kronecker-factored RTRL (KF-RTRL), for any Flax linen cell built from Dense layers.

For every Dense kernel ``W`` (``z = a W + b``) of the cell the influence ``J_W = dh_t/dW`` is
kept as one Kronecker product ``u ⊗ A`` (``u ∈ R^in``, ``A ∈ R^{S×out}``). One exact step gives
two terms,

    J_W ← u ⊗ (D_t A) + a_t ⊗ G_t,         G_t = ∂h_t/∂z,

which are merged back into one with independent random signs ``c1, c2 ∈ {±1}``:

    u ← c1 p1 u + c2 p2 a_t,     A ← c1 (D_t A)/p1 + c2 G_t/p2,
    p1 = sqrt(‖D_t A‖/‖u‖),      p2 = sqrt(‖G_t‖/‖a_t‖).

The estimate is unbiased because ``E[c1 c2] = 0``; its error is
``c1 c2 (p1/p2 · u ⊗ G_t + p2/p1 · a_t ⊗ D_t A)`` and the scale factors ``p1, p2`` minimise its
variance, which is

    E‖merged − exact‖² = 2 ‖u‖ ‖D_t A‖ ‖a_t‖ ‖G_t‖ + 2 (u·a_t) ⟨D_t A, G_t⟩_F.

A term with a zero factor is dropped from the merge (it contributes nothing). Parameters that are
not factored Dense kernels are tracked exactly (see :mod:`rtrl_jax._src.kronecker`).

With ``joint=True`` the kernels that feed one pre-activation share one pair ``u ⊗ A``, ``u`` over
their stacked inputs and a 1 for each of their biases: for the tanh RNN
``h_t = tanh(W_i x_t + W_h h_{t-1} + b)`` that is ``u`` over ``[x_t; h_{t-1}; 1]`` and one ``A``,
Mujika et al.'s original estimator, one ``D_t A`` product per step instead of three (two kernels
and the bias's rows); the merge is the same with ``a_t`` the stacked input.

Cost per step for an ``n``-unit cell: ``O(n³)`` time, ``O(n²)`` memory per kernel.

Reference: A. Mujika, F. Meier and A. Steger, "Approximating Real-Time Recurrent Learning with
Random Kronecker Factors", NeurIPS 2018, arXiv:1805.10842.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.kronecker import KroneckerState, kronecker_estimator, unsupported_reason
from rtrl_jax._src.registry import register

KFRTRLState = KroneckerState
"""The KF-RTRL trace: a :class:`~rtrl_jax.KroneckerState` of rank 1."""


def _balanced(u: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(u, a, p)`` with ``p = sqrt(‖a‖/‖u‖)``; a term with a zero factor becomes zero (p = 1)."""
    norm_u, norm_a = jnp.linalg.norm(u), jnp.linalg.norm(a)
    nonzero = (norm_u > 0) & (norm_a > 0)
    p = jnp.sqrt(jnp.where(nonzero, norm_a, 1.0) / jnp.where(nonzero, norm_u, 1.0))
    return jnp.where(nonzero, u, 0.0), jnp.where(nonzero, a, 0.0), p


def kf_merge(u: jax.Array, a: jax.Array, signs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The unbiased random-sign merge of two Kronecker terms ``u[0] ⊗ a[0] + u[1] ⊗ a[1]``.

    Args:
      u: ``(2, in)`` input-side factors.
      a: ``(2, ...)`` carry-side factors (any trailing shape; the estimator passes ``(2, out, S)``).
      signs: ``(2,)`` the signs ``c1, c2`` (each ±1, independent and uniform for unbiasedness).

    Returns:
      ``(u, a)`` of shapes ``(1, in)``, ``(1, ...)``.
    """
    u1, a1, p1 = _balanced(u[0], a[0])
    u2, a2, p2 = _balanced(u[1], a[1])
    c1, c2 = signs[0].astype(u.dtype), signs[1].astype(u.dtype)
    # Scalar coefficients first: one pass of multiply-adds over the factors, no division per entry.
    new_u = (c1 * p1) * u1 + (c2 * p2) * u2
    new_a = (c1 / p1) * a1 + (c2 / p2) * a2
    return new_u[None], new_a[None]


def _random_merge(u: jax.Array, a: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    return kf_merge(u, a, jax.random.rademacher(key, (2,), dtype=u.dtype))


def kf_rtrl(core, *, joint: bool = False) -> Estimator:
    """KF-RTRL for a Flax linen cell: one Kronecker factor pair per Dense kernel.

    Args:
      core: a :class:`~rtrl_jax.Core` built with :func:`~rtrl_jax.from_linen` whose cell has at
        least one ``flax.linen.Dense`` layer (``SimpleCell``, ``GRUCell``, ``LSTMCell``, ``MGUCell``
        or a user cell made of Dense layers).
      joint: one factor pair per pre-activation instead of per kernel: the kernels whose outputs
        are summed share it with their biases (found by a probe of the cell,
        :func:`rtrl_jax._src.kronecker.kronecker_layout`). Cheaper, coarser.

    Returns:
      An :class:`~rtrl_jax.Estimator` with a :class:`~rtrl_jax.KroneckerState` trace (rank 1);
      ``step`` needs ``key=``.

    Raises:
      ValueError: if the core has no linen cell or the cell has no Dense kernel (the message names
        the estimators that can serve it).

    Example:
      >>> est = kf_rtrl(core)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x, key=key)
      >>> grads = est.grad(trace, params, carry_bar)
    """
    return kronecker_estimator(core, rank=1, reduce=_random_merge, name="KF-RTRL", joint=joint)


register(
    "kf",
    kf_rtrl,
    summary="KF-RTRL: one Kronecker factor pair per Dense kernel, random-sign merge",
    needs_key=True,
    unsupported_reason=unsupported_reason,
)
