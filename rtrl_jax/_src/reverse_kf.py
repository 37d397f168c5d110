"""Reverse KF-RTRL (R-KF), for any Flax linen cell built from Dense layers.

KF-RTRL keeps the influence of a Dense kernel ``W ∈ R^{in×out}`` (``z = a W + b``) as
``u ⊗ A`` with ``u`` over the kernel's input index and ``A ∈ R^{S×out}`` over the output index.
Reverse KF-RTRL factors it along the other side,

    J_W[s, i, j] ≈ B[s, i] · b[j],       B ∈ R^{S×in},  b ∈ R^out,

so that the carry-side factor runs over the presynaptic index, as in Marschall et al.'s taxonomy.
The propagated term stays one product, ``D_t J_W ≈ (D_t B) ⊗ b``, but the immediate term
``a_t ⊗ G_t`` (``G_t = ∂h_t/∂z``, ``I[s, i, j] = a_i G_t[s, j]``) is one product only along the
kernel's input side. It enters as its unbiased rank-one estimate with random signs
``ν ∈ {±1}^out`` (``E[ν νᵀ] = I``):

    I ≈ ((G_t ν) ⊗ a_t) ⊗ ν,        E_ν[(G_t ν)_s ν_j] = G_t[s, j].

The two terms ``(D_t B) ⊗ b`` and ``((G_t ν) ⊗ a_t) ⊗ ν`` are then merged with KF-RTRL's
random-sign merge (:func:`~rtrl_jax.kf_merge`, signs ``c1, c2``; the sign estimate of ``I`` is
:func:`rtrl_jax._src.kronecker.reverse_immediate`):

    b ← c1 p1 b + c2 p2 ν,     B ← c1 (D_t B)/p1 + c2 ((G_t ν) ⊗ a_t)/p2,
    p1 = sqrt(‖D_t B‖/‖b‖),    p2 = sqrt(‖G_t ν‖ ‖a_t‖/‖ν‖).

Unbiased: the merge is unbiased given ``ν`` (``E[c1 c2] = 0``) and ``ν``'s estimate is unbiased.
With ``X1 = (D_t B) ⊗ b`` and ``I = a_t ⊗ G_t`` the exact step, the variance of one step is

    E‖J̃ − (X1 + I)‖²_F = E_ν[2 ‖b‖ ‖D_t B‖ ‖ν‖ ‖G_t ν‖ ‖a_t‖] + 2 ⟨X1, I⟩_F
                          + (out − 1) ‖a_t‖² ‖G_t‖²_F,

the merge's variance given ``ν`` (KF-RTRL's closed form, whose cross term averages over ``ν`` to
``2 ⟨X1, I⟩_F``) plus the variance of the sign estimate of ``I``, ``‖a_t‖² E‖G_t(ν νᵀ − I)‖²_F``.
For a vanilla RNN ``G_t = diag(φ')`` and this is the estimator of Marschall et al.; it costs, like
KF-RTRL, ``O(n³)`` per step (``D_t`` applied to the ``in`` rows of ``B``) and ``O(n²)`` memory per
kernel. Parameters that are not factored Dense kernels are tracked exactly (see
:mod:`rtrl_jax._src.kronecker`).

Reference: O. Marschall, K. Cho and C. Savin, "A Unified Framework of Online Learning Algorithms
for Training Recurrent Neural Networks", JMLR 21(135), 2020, arXiv:1907.02649 (Reverse KF-RTRL).
"""

from __future__ import annotations

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.kf_rtrl import _random_merge
from rtrl_jax._src.kronecker import KroneckerState, kronecker_estimator, unsupported_reason
from rtrl_jax._src.registry import register

RKFState = KroneckerState
"""The reverse KF-RTRL trace: a :class:`~rtrl_jax.KroneckerState` of rank 1 whose ``u`` factors run
over each kernel's output index and ``a`` factors over its input index."""


def reverse_kf_rtrl(core) -> Estimator:
    """Reverse KF-RTRL for a Flax linen cell: ``J_W ≈ B ⊗ b`` per Dense kernel, over its input index.

    Args:
      core: a linen cell's :class:`~rtrl_jax.Core` with a ``flax.linen.Dense`` layer applied once per
        step, the cores :func:`~rtrl_jax.kf_rtrl` serves.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is a rank-1 :class:`~rtrl_jax.KroneckerState` in
      the reverse layout, ``u[k]`` of shape ``(1, out)`` and ``a[k]`` of shape ``(1, in, S)``.
      Its ``step`` needs ``key=``.

    Raises:
      ValueError: for a core without such a cell; the message names the estimators that serve it.

    Example:
      >>> est = reverse_kf_rtrl(core)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x, key=key)
      >>> grads = est.grad(trace, params, carry_bar)
    """
    return kronecker_estimator(core, rank=1, reduce=_random_merge, name="R-KF-RTRL", reverse=True)


register(
    "rkf",
    reverse_kf_rtrl,
    summary="reverse KF-RTRL: one Kronecker pair per Dense kernel over its input side, random signs",
    needs_key=True,
    unsupported_reason=unsupported_reason,
)
