"""RFLO: random-feedback local online learning (Murray 2019), and e-prop for leaky units.

RFLO keeps SnAp-1's trace shape, the entries of ``J_t`` in the pattern of the immediate Jacobian
``I_t = ∂F/∂θ``, but replaces the dynamics ``D_t`` by a constant leak ``α``:

    J_t = α J_{t-1} + I_t        (on the pattern of I; zero elsewhere).

For Murray's leaky network ``h_t = α h_{t-1} + (1 - α) φ(W h_{t-1} + U x_t + b)`` with
``α = 1 - 1/τ``, the entry for ``W_kj`` is ``e_t = α e_{t-1} + (1/τ) φ'(z_k) h_{j,t-1}``: RFLO's
eligibility trace, which is also e-prop's eligibility trace for non-spiking leaky units (Bellec et
al. 2020), whose "internal dynamics" is the leak. The gradient of a step loss is ``c_t · J_t``;
RFLO's random feedback (and e-prop's broadcast learning signal) is a choice of the cotangent
``c_t`` that the caller passes to ``grad``; with the true ``c_t`` it is "symmetric" RFLO/e-prop.

The pattern of ``I`` is found from the cell, as for SnAp (:func:`rtrl_jax.sparsity_patterns`), and
the trace is stored compressed: ``nnz(I)`` numbers, ``P`` for a vanilla or leaky RNN. A step costs a
forward pass and one reverse pass per colour of ``I``'s rows (one for such cells).

**The leak.** ``leak`` is ``α = 1 - 1/τ`` for a time constant ``τ`` in steps: a scalar, or an array
with one value per flat carry entry. ``leak=None`` takes the cell's own ``leak`` attribute
(:class:`~rtrl_jax.LeakyRNNCell`); other cells need an explicit value.

References: J. M. Murray, "Local online learning in recurrent networks with random feedback", eLife
8:e43299, 2019; G. Bellec et al., "A solution to the learning dilemma for recurrent networks of
spiking neurons", Nature Communications 11:3625, 2020.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.registry import register
from rtrl_jax._src.snap import (
    SnapState,
    _sparse_trace_estimator,
    layout_from_mask,
    snap_unsupported_reason,
    sparsity_patterns,
)

RFLOState = SnapState


def _resolve_leak(core: Any, leak: Any) -> Any:
    if leak is None:
        leak = getattr(getattr(core, "module", None), "leak", None)
        if leak is None:
            name = getattr(core, "name", type(core).__name__)
            raise ValueError(
                f"rflo needs leak= (α = 1 - 1/τ) for core {name!r}: its cell has no leak attribute."
            )
    array = np.asarray(leak, np.float64)
    if array.ndim not in (0, 1):
        raise ValueError(f"leak must be a scalar or one value per carry entry, got {array.shape}.")
    if array.ndim == 1 and hasattr(core, "carry_size") and array.shape[0] != core.carry_size:
        raise ValueError(f"leak has {array.shape[0]} values, the carry has {core.carry_size}.")
    if np.any(array < 0) or np.any(array > 1):
        raise ValueError(f"leak must lie in [0, 1], got {leak!r}.")
    return float(array) if array.ndim == 0 else array


def rflo(
    core: Any,
    leak: Any = None,
    *,
    num_probes: int = 3,
    seed: int = 0,
) -> Estimator:
    """RFLO (Murray 2019): the SnAp-1-shaped trace with ``D_t`` replaced by the leak ``α``.

    Args:
      core: an :class:`~rtrl_jax.Core` (its specs are needed to probe the pattern of ``I``).
      leak: ``α = 1 - 1/τ``, a scalar or one value per flat carry entry; ``None`` reads the cell's
        ``leak`` attribute (:class:`~rtrl_jax.LeakyRNNCell`).
      num_probes: random points for the pattern probe.
      seed: NumPy seed of the pattern probe.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`RFLOState` (``values``: the ``nnz(I)``
      kept entries, column-major).

    Example:
      >>> core = from_linen(LeakyRNNCell(32, tau=4.0), input_size=2)
      >>> est = rflo(core)                      # α = 1 - 1/4 from the cell
      >>> carry, out, trace = est.step(est.init(params, carry), params, carry, x)
    """
    alpha = _resolve_leak(core, leak)
    patterns = sparsity_patterns(core, num_probes=num_probes, seed=seed)
    layout = layout_from_mask(patterns.immediate, patterns.immediate, patterns.dynamics, propagate=False)
    return _sparse_trace_estimator(core, layout, leak=alpha)


register(
    "rflo",
    rflo,
    summary="RFLO / e-prop: SnAp-1-shaped trace with the dynamics replaced by a leak",
    unsupported_reason=snap_unsupported_reason,
    example_options={"leak": 0.5},
)
