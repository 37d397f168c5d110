"""KeRNL: Kernel RNN Learning (Roth, Kanitscheider & Fiete 2019), for any core with specs.

KeRNL replaces the sensitivity of the state to an earlier state, ``∂h_t/∂h_{t'} = D_t ⋯ D_{t'+1}``,
by a learned low-dimensional ansatz, a unit-to-unit *sensitivity* matrix ``β`` (``S × S``) times a
per-unit exponential *kernel* with learned decay rates ``γ`` (``S``):

    ∂h_t/∂h_{t'} ≈ β diag(κ)^{t-t'},        κ = exp(-γ).

Summing the immediate influences ``I_{t'} = ∂F/∂θ`` through it gives the influence matrix

    J_t = Σ_{t'≤t} (∂h_t/∂h_{t'}) I_{t'} ≈ β E_t,        E_t = κ ⊙ E_{t-1} + I_t,

where the *eligibility trace* ``E_t`` has the shape of SnAp-1's (the entries of ``I``'s pattern,
``P`` numbers for a vanilla, leaky or gated RNN): it is RFLO's trace with the learned per-unit leak
``κ`` (:func:`rtrl_jax.rflo`). The gradient of a step loss with carry cotangent ``c_t`` is

    c_t · J_t ≈ (βᵀ c_t) · E_t.

**Learning β and γ by perturbation.** A shadow of the carry runs beside it through the same core and
inputs, and gets fresh Gaussian noise ``σ ξ_t`` (``ξ_t ~ N(0, I)``) added to its state after every
step; its offset ``δ_t = (h̃_t - h_t)/σ`` is, to first order in ``σ``, the response of the state to
all the noise so far, ``δ_t = D_t δ_{t-1} + ξ_t = Σ_{t'} (∂h_t/∂h_{t'}) ξ_{t'}``. The ansatz predicts it
as ``β ω_t`` with the kernel-filtered noise ``ω_t = κ ⊙ ω_{t-1} + ξ_t``, and ``β``, ``γ`` take one SGD
step on the prediction loss ``ℓ_t = ½ ‖β ω_t - δ_t‖²`` (learning rate ``η``):

    e_t = β ω_t - δ_t,
    ∂ℓ_t/∂β = e_t ω_tᵀ,          β ← β - η e_t ω_tᵀ,
    ∂ℓ_t/∂γ = (βᵀ e_t) ⊙ Γ_t,    γ ← max(γ - η (βᵀ e_t) ⊙ Γ_t, 0),
    Γ_t = ∂ω_t/∂γ = κ ⊙ (Γ_{t-1} - ω_{t-1})     (γ held fixed along the history, as RTRL does).

So ``β`` and ``γ`` learn from the forward dynamics and the perturbations only: no loss information
enters (as in the paper's Algorithm 1), and they live in the trace, updated inside ``step``; ``grad``
only reads them. (Plain SGD keeps no optimiser state.) Dividing by ``σ`` makes ``η`` independent of
the noise scale; ``γ ≥ 0`` keeps the kernel from growing.

Where the ansatz holds exactly, KeRNL is exact: on a network whose state sensitivity is a per-unit
exponential (``D_t = diag(d)``), ``β = I``, ``κ = d`` make the prediction error zero, so they are
the fixed point the perturbation learning converges to, and there ``β E_t = J_t``. With ``β = I`` and
``η = 0`` KeRNL *is* RFLO with leak ``exp(-γ_0)``.

**Form.** Roth et al. perturb the pre-activations of a vanilla RNN, ``a_t = W h_{t-1} + U x_t``,
and filter ``∂a/∂W = h_{t-1}`` into the trace; the form here, as in the unified framework of
Marschall, Cho & Savin (2020), perturbs the *state* and filters the immediate influence ``I_t``
(which holds ``φ'(a_t)``). It needs nothing from the cell but its step function, so it serves every
core whose specs give ``I``'s pattern (as RFLO and SnAp), a pytree carry flattened.

Cost per step: two forward passes (the core and its shadow), one reverse pass per colour of ``I``'s
rows (one for vanilla/gated RNNs), ``O(S² + P)`` arithmetic; trace ``P + S² + 4S`` numbers. ``β`` and
``γ`` are per stream (under ``jax.vmap`` every stream learns its own). They start from ``β = I``,
``γ = γ_0`` in ``init`` only: at an episode start the loops call :attr:`Estimator.restart
<rtrl_jax.Estimator>`, which keeps them and starts the per-episode parts again as ``init`` does
(``E = 0``, the shadow on the carry, ``ω = Γ = 0``), so the kernel learned in one episode serves
the next.

References: C. Roth, I. Kanitscheider and I. Fiete, "Kernel RNN Learning (KeRNL)", ICLR 2019;
O. Marschall, K. Cho and C. Savin, "A unified framework of online learning algorithms for training
recurrent neural networks", JMLR 21(135), 2020, arXiv:1907.02649.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.registry import register
from rtrl_jax._src.snap import (
    SnapState,
    _sparse_trace_estimator,
    layout_from_mask,
    snap_unsupported_reason,
    sparsity_patterns,
)


class KeRNLState(NamedTuple):
    """Trace of KeRNL: ``J_t ≈ β E_t``, with what learns ``β`` and ``γ``.

    Attributes:
      eligibility: ``E_t``, the kernel-filtered immediate influence, stored as RFLO's trace
        (:class:`rtrl_jax.RFLOState` ``.values``: a pytree shaped like the parameters for cells
        whose parameters each move one carry entry, else the ``nnz(I)`` kept entries).
      sensitivity: ``(S, S)`` the learned ``β`` on the flat carry.
      decay_rate: ``(S,)`` the learned ``γ ≥ 0``; the kernel is ``κ = exp(-γ)`` per step.
      shadow: ``(S,)`` the perturbed shadow ``h̃_t`` of the flat carry.
      noise_trace: ``(S,)`` the kernel-filtered noise ``ω_t``.
      noise_trace_grad: ``(S,)`` ``Γ_t = ∂ω_t/∂γ``.
    """

    eligibility: Any
    sensitivity: jax.Array
    decay_rate: jax.Array
    shadow: jax.Array
    noise_trace: jax.Array
    noise_trace_grad: jax.Array


class KernelUpdate(NamedTuple):
    """One step of the perturbation learning (:func:`kernel_update`)."""

    sensitivity: jax.Array
    decay_rate: jax.Array
    noise_trace: jax.Array
    noise_trace_grad: jax.Array
    loss: jax.Array


def kernel_update(
    sensitivity: jax.Array,
    decay_rate: jax.Array,
    noise_trace: jax.Array,
    noise_trace_grad: jax.Array,
    noise: jax.Array,
    response: jax.Array,
    learning_rate: float,
) -> KernelUpdate:
    """One SGD step of ``β`` and ``γ`` on predicting a perturbation's response.

    Args:
      sensitivity: ``β`` ``(S, S)``.
      decay_rate: ``γ`` ``(S,)``.
      noise_trace: ``ω_{t-1}`` ``(S,)``.
      noise_trace_grad: ``Γ_{t-1} = ∂ω_{t-1}/∂γ`` ``(S,)``.
      noise: ``ξ_t`` ``(S,)``, the (unit-scale) noise added at step ``t``.
      response: ``δ_t`` ``(S,)``, the observed (unit-scale) offset of the shadow.
      learning_rate: ``η``.

    Returns:
      :class:`KernelUpdate` with the new ``β``, ``γ``, ``ω_t``, ``Γ_t`` and the loss
      ``½ ‖β ω_t - δ_t‖²`` before the step.
    """
    kernel = jnp.exp(-decay_rate)
    noise_trace_grad = kernel * (noise_trace_grad - noise_trace)
    noise_trace = kernel * noise_trace + noise
    error = sensitivity @ noise_trace - response
    sensitivity_grad = jnp.outer(error, noise_trace)
    decay_grad = (sensitivity.T @ error) * noise_trace_grad
    return KernelUpdate(
        sensitivity=sensitivity - learning_rate * sensitivity_grad,
        decay_rate=jnp.maximum(decay_rate - learning_rate * decay_grad, 0.0),
        noise_trace=noise_trace,
        noise_trace_grad=noise_trace_grad,
        loss=0.5 * jnp.sum(error**2),
    )


def kernl(
    core: Any,
    *,
    kernel_learning_rate: float = 1e-3,
    noise_scale: float = 1e-3,
    initial_decay_rate: float = 1.0,
    num_probes: int = 3,
    seed: int = 0,
) -> Estimator:
    """KeRNL (Roth et al. 2019): ``J_t ≈ β E_t`` with a learned sensitivity ``β`` and kernel ``γ``.

    Args:
      core: an :class:`~rtrl_jax.Core` (its specs give the pattern of ``I``, as for RFLO).
      kernel_learning_rate: ``η``, the SGD learning rate of ``β`` and ``γ`` (``0`` freezes them;
        named apart from the model's learning rate, which configs and benchmarks also set).
      noise_scale: ``σ``, the standard deviation of the perturbation added to the shadow per step
        (small, so that the shadow's offset is the linear response; large enough to stand out of
        the rounding of ``h̃ - h`` in the trace's dtype).
      initial_decay_rate: ``γ_0`` for every unit (kernel ``exp(-γ_0)`` per step); ``β_0 = I``.
      num_probes: random points for the pattern probe of ``I``.
      seed: NumPy seed of the pattern probe.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`KeRNLState`; ``step`` needs ``key=``
      (the perturbation noise); ``restart`` keeps ``β`` and ``γ``.

    Example:
      >>> core = from_linen(LeakyRNNCell(16, tau=2.0), input_size=2)
      >>> est = kernl(core, kernel_learning_rate=1e-3)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x, key=key)   # learns β, γ too
      >>> grads = est.grad(trace, params, carry_bar)    # (βᵀ carry_bar) · E_t
    """
    if not float(kernel_learning_rate) >= 0:
        raise ValueError(f"kernl's kernel_learning_rate must be >= 0, got {kernel_learning_rate!r}.")
    if not float(noise_scale) > 0:
        raise ValueError(f"kernl's noise_scale must be > 0, got {noise_scale!r}.")
    if not float(initial_decay_rate) >= 0:
        raise ValueError(f"kernl's initial_decay_rate must be >= 0, got {initial_decay_rate!r}.")
    patterns = sparsity_patterns(core, num_probes=num_probes, seed=seed)
    layout = layout_from_mask(patterns.immediate, patterns.immediate, patterns.dynamics, propagate=False)

    def eligibility(kernel):
        # RFLO's trace with leak κ per carry entry (κ may be traced: it is only multiplied in)
        return _sparse_trace_estimator(core, layout, leak=kernel)

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(*jax.tree.leaves(params), flat_carry)
        size = flat_carry.size
        zeros = jnp.zeros((size,), dtype)
        return KeRNLState(  # every leaf its own array, so that a donated trace donates each once
            eligibility=eligibility(zeros).init(params, carry).values,
            sensitivity=jnp.eye(size, dtype=dtype),
            decay_rate=jnp.full((size,), initial_decay_rate, dtype),
            shadow=jnp.array(flat_carry, dtype),
            noise_trace=jnp.zeros((size,), dtype),
            noise_trace_grad=jnp.zeros((size,), dtype),
        )

    def step(trace, params, carry, x, *, key=None):
        if key is None:
            raise ValueError("KeRNL.step needs a random key for its perturbation: step(..., key=key).")
        dtype = trace.shadow.dtype
        kernel = jnp.exp(-trace.decay_rate)
        new_carry, out, new_eligibility = eligibility(kernel).step(
            SnapState(trace.eligibility), params, carry, x
        )
        flat_new, unravel_carry = ravel_pytree(new_carry)
        shadow_carry, _ = core(params, unravel_carry(trace.shadow.astype(flat_new.dtype)), x)
        noise = jax.random.normal(key, trace.shadow.shape, dtype)
        shadow = ravel_pytree(shadow_carry)[0].astype(dtype) + noise_scale * noise
        response = (shadow - flat_new.astype(dtype)) / noise_scale
        update = kernel_update(
            trace.sensitivity,
            trace.decay_rate,
            trace.noise_trace,
            trace.noise_trace_grad,
            noise,
            response,
            kernel_learning_rate,
        )
        new_trace = KeRNLState(
            eligibility=new_eligibility.values,
            sensitivity=update.sensitivity,
            decay_rate=update.decay_rate,
            shadow=shadow,
            noise_trace=update.noise_trace,
            noise_trace_grad=update.noise_trace_grad,
        )
        return new_carry, out, new_trace

    def grad(trace, params, carry_bar):
        flat_bar, _ = ravel_pytree(carry_bar)
        signal = trace.sensitivity.T @ flat_bar.astype(trace.sensitivity.dtype)
        return eligibility(trace.decay_rate).grad(SnapState(trace.eligibility), params, signal)

    def restart(trace, params, carry, *, key=None):
        fresh = init(params, carry, key=key)
        return fresh._replace(sensitivity=trace.sensitivity, decay_rate=trace.decay_rate)

    return Estimator(init, step, grad, restart=restart)


register(
    "kernl",
    kernl,
    summary="KeRNL: RFLO-shaped trace times a sensitivity matrix, per-unit kernel learned by perturbation",
    needs_key=True,
    unsupported_reason=snap_unsupported_reason,
    example_options={"kernel_learning_rate": 1e-2, "noise_scale": 1e-2},
)
