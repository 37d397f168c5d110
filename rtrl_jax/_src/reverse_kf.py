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

The two terms ``X1 = (D_t B) ⊗ b`` and ``X2 = ((G_t ν) ⊗ a_t) ⊗ ν`` (the sign estimate is
:func:`rtrl_jax._src.kronecker.reverse_immediate`) are merged as KF-RTRL merges its two terms
(:func:`~rtrl_jax.kf_merge`), with ``ν`` itself doing the work of the random signs:

    b ← p1 b + p2 ν,     B ← (D_t B)/p1 + ((G_t ν) ⊗ a_t)/p2,
    p1 = sqrt(‖D_t B‖/‖b‖),    p2 = sqrt(‖G_t ν‖ ‖a_t‖/‖ν‖).

Unbiased: the product is ``X1 + X2`` plus the cross terms ``(p1/p2) b ⊗ ((G_t ν) ⊗ a_t)`` and
``(p2/p1) ν ⊗ (D_t B)``, which are odd in ``ν`` (``p2`` is even) and vanish in mean, and
``E_ν[X2] = I``. The cross terms (odd) are uncorrelated with ``X2 − I`` (even), so with
``I = a_t ⊗ G_t`` the variance of one step is

    E‖J̃ − (X1 + I)‖²_F = E_ν[2 ‖b‖ ‖D_t B‖ ‖ν‖ ‖G_t ν‖ ‖a_t‖] + 2 ⟨X1, I⟩_F
                          + (out − 1) ‖a_t‖² ‖G_t‖²_F:

the cross terms' (KF-RTRL's closed form, whose inner-product term averages over ``ν`` to
``2 ⟨X1, I⟩_F``) plus the sign estimate's, ``‖a_t‖² E‖G_t(ν νᵀ − I)‖²_F``. Independent merge signs
``c1, c2`` on top (as KF-RTRL draws) would leave it unchanged. A term with a zero factor (``b = 0``
at the first step) is dropped from the merge.
For a vanilla RNN ``G_t = diag(φ')`` and this is Marschall et al.'s update; it costs, like
KF-RTRL, ``O(n³)`` per step (``D_t`` applied to the ``in`` rows of ``B``) and ``O(n²)`` memory per
kernel. Parameters that are not factored Dense kernels are tracked exactly (see
:mod:`rtrl_jax._src.kronecker`). With ``joint=True`` the kernels that feed one pre-activation share
one pair, ``B`` over their stacked inputs and a 1 for each of their biases (as KF-RTRL's ``joint``).

Reference: O. Marschall, K. Cho and C. Savin, "A Unified Framework of Online Learning Algorithms
for Training Recurrent Neural Networks", JMLR 21(135), 2020, arXiv:1907.02649 (Reverse KF-RTRL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.kf_rtrl import kf_merge
from rtrl_jax._src.kronecker import KroneckerState, kronecker_estimator, unsupported_reason
from rtrl_jax._src.registry import register

RKFState = KroneckerState
"""The reverse KF-RTRL trace: a :class:`~rtrl_jax.KroneckerState` of rank 1 whose ``u`` factors run
over each kernel's output index and ``a`` factors over its input index."""


def _merge(u: jax.Array, a: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """KF-RTRL's merge with both signs +1: the immediate term's ``ν`` already randomises it."""
    del key
    return kf_merge(u, a, jnp.ones((2,), u.dtype))


def reverse_kf_rtrl(core, *, joint: bool = False) -> Estimator:
    """Reverse KF-RTRL for a Flax linen cell: ``J_W ≈ B ⊗ b`` per Dense kernel, over its input index.

    Args:
      core: a linen cell's :class:`~rtrl_jax.Core` with a ``flax.linen.Dense`` layer applied once per
        step, the cores :func:`~rtrl_jax.kf_rtrl` serves.
      joint: one pair per pre-activation instead of per kernel, as :func:`~rtrl_jax.kf_rtrl`'s.

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
    return kronecker_estimator(core, rank=1, reduce=_merge, name="R-KF-RTRL", reverse=True, joint=joint)


register(
    "rkf",
    reverse_kf_rtrl,
    summary="reverse KF-RTRL: one Kronecker pair per Dense kernel over its input side, random signs",
    needs_key=True,
    unsupported_reason=unsupported_reason,
)
