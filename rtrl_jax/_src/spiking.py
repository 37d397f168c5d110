"""Spiking recurrent cells: leaky integrate-and-fire (LIF) and adaptive LIF (ALIF) neurons.

The neuron models of e-prop (Bellec et al. 2020), as ``flax.linen`` recurrent cells with the
``RNNCellBase`` conventions (``cell(carry, x) -> (carry, out)``, ``initialize_carry``,
``num_feature_axes``), so that ``nn.RNN`` runs them and :func:`rtrl_jax.from_linen` turns them into
cores that every estimator serves: exact RTRL and BPTT as well as e-prop (:func:`rtrl_jax.eprop`).

**Dynamics** (one step, time constants in steps, ``α = exp(-1/τ)``, ``ρ = exp(-1/τ_a)``)::

    v_{t+1} = α v_t + W_in x_{t+1} + W_rec z_t − z_t v_th          membrane, reset by subtraction
    a_{t+1} = ρ a_t + z_t                                           adaptation (ALIF only)
    A_{t+1} = v_th + β a_{t+1}                                      threshold (LIF: A = v_th)
    z_{t+1} = H(v_{t+1} − A_{t+1})                                  spike (0 while refractory)

The spike's derivative is the pseudo-derivative (a surrogate for the Heaviside step ``H``)

    ψ = ∂z/∂v = (γ / v_th) max(0, 1 − |v − A| / v_th),

defined with ``jax.custom_jvp`` on the spike function, so that every use of autodiff (exact RTRL,
BPTT, the patterns SnAp probes, e-prop's eligibility traces) differentiates the same surrogate.

**What is modelled, and how it differs from the paper's code.**

- The carry holds the spikes: ``LIFState(v, z)`` and ``ALIFState(v, a, z)`` (``z`` = the spikes of
  the last step, which the next step reads through ``W_rec``, the reset and the adaptation). The
  step's output is the new spike vector ``z``, read off the carry; a readout (leaky or not) belongs
  to the head. Its ``v`` is in the carry too, for a membrane-potential readout.
- Reset by subtraction of ``v_th`` (not of the adaptive threshold), as in the paper. With
  ``detach_reset=True`` (the default) the reset carries no gradient (``stop_gradient`` on ``z`` in
  ``z v_th``): the paper's eligibility traces ignore it (``ε^v_{t+1} = α ε^v_t + z^t_i``), and the
  autodiff of the cell (exact RTRL, BPTT) then ignores it too, so that all of them compute gradients
  of the same surrogate model. ``detach_reset=False`` differentiates the reset
  (``∂v_{t+1}/∂v_t = α − v_th ψ_t``); exact RTRL and BPTT still agree, and e-prop's trace then
  includes the reset's term.
- Refractoriness (``refractory = k > 0`` steps): a neuron that spikes at step ``t`` cannot spike
  at steps ``t+1 … t+k``, and its pseudo-derivative is zero there (as in the paper). The carry then
  holds the spikes of the last ``k`` steps, ``recent`` (shape ``(k, features)``, no gradient).
- Self-connections (autapses): ``self_connections=True`` (the default) keeps ``W_rec`` a plain
  ``nn.Dense`` (named ``"recurrent"``), so Kronecker-factored estimators (KF-RTRL, r-OK) factor
  it; ``False`` zeroes its diagonal, as the paper's networks do (the kernel is then a masked
  parameter ``recurrent/kernel``, tracked exactly by those estimators). With autapses, a neuron's
  own dynamics, and so e-prop's eligibility trace, includes ``W_jj ψ_j``; without them e-prop
  here is exactly the paper's.
- Not modelled: per-neuron or learned time constants and thresholds (they are fixed attributes),
  synaptic delays, ``dt`` other than one step, the ``1/dt`` spike scaling.

References: G. Bellec, F. Scherr, A. Subramoney, E. Hajek, D. Salaj, R. Legenstein and W. Maass,
"A solution to the learning dilemma for recurrent networks of spiking neurons", Nature
Communications 11:3625, 2020, arXiv:1901.09049 (Methods: neuron models and eligibility traces).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rtrl_jax._src.snap import probing_structure


class LIFState(NamedTuple):
    """Carry of :class:`LIFCell` (arrays of shape ``(*batch, features)``).

    Attributes:
      v: membrane potentials ``v_t``.
      z: spikes ``z_t`` (0 or 1); the cell's output.
      recent: spikes of the last ``refractory`` steps, ``(*batch, refractory, features)``, newest
        first; ``None`` without refractoriness.
    """

    v: jax.Array
    z: jax.Array
    recent: jax.Array | None = None


class ALIFState(NamedTuple):
    """Carry of :class:`ALIFCell` (arrays of shape ``(*batch, features)``).

    Attributes:
      v: membrane potentials ``v_t``.
      a: threshold adaptations ``a_t`` (the threshold is ``v_th + β a_t``).
      z: spikes ``z_t`` (0 or 1); the cell's output.
      recent: spikes of the last ``refractory`` steps (see :class:`LIFState`), or ``None``.
    """

    v: jax.Array
    a: jax.Array
    z: jax.Array
    recent: jax.Array | None = None


@jax.custom_jvp
def spike(u: jax.Array, dampening: jax.Array) -> jax.Array:
    """``H(u)`` (1 where ``u > 0``) with the pseudo-derivative ``dampening · max(0, 1 − |u|)``.

    ``u = (v − A) / v_th`` is the distance to the threshold in units of ``v_th``, so that
    ``∂z/∂v = ψ = (γ / v_th) max(0, 1 − |v − A| / v_th)`` (Bellec et al. 2020, Methods). No
    derivative flows into ``dampening``.
    """
    return (u > 0).astype(u.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    u, dampening = primals
    u_dot, _ = tangents
    pseudo = dampening * jnp.maximum(0.0, 1.0 - jnp.abs(u))
    return spike(u, dampening), (pseudo * u_dot).astype(u.dtype)


@jax.custom_jvp
def _spike_structural(u: jax.Array, dampening: jax.Array) -> jax.Array:
    """The spike for the sparsity probes: a derivative that is non-zero everywhere."""
    del dampening
    return (u > 0).astype(u.dtype)


@_spike_structural.defjvp
def _spike_structural_jvp(primals, tangents):
    u, dampening = primals
    return _spike_structural(u, dampening), tangents[0]


def pseudo_derivative(v: jax.Array, threshold: jax.Array, v_th: float, dampening: float) -> jax.Array:
    """``ψ = (γ / v_th) max(0, 1 − |v − A| / v_th)`` with ``A = threshold`` (for tests and traces)."""
    return dampening / v_th * jnp.maximum(0.0, 1.0 - jnp.abs(v - threshold) / v_th)


class _MaskedDense(nn.Module):
    """``z @ (W ⊙ (1 − I))``: a square kernel without its diagonal (no autapses)."""

    features: int
    kernel_init: Callable[..., Any]
    param_dtype: Any

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", self.kernel_init, (self.features, self.features), self.param_dtype)
        off_diagonal = 1.0 - jnp.eye(self.features, dtype=kernel.dtype)
        return inputs @ (kernel * off_diagonal)


class _SpikingCell(nn.RNNCellBase):
    """What LIF and ALIF share: the input and recurrent currents, the spike, refractoriness."""

    features: int
    tau: float = 20.0
    threshold: float = 0.6
    dampening: float = 0.3
    refractory: int = 0
    self_connections: bool = True
    detach_reset: bool = True
    use_bias: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    recurrent_init: Callable[..., Any] = nn.initializers.lecun_normal()
    param_dtype: Any = jnp.float32

    @property
    def leak(self) -> float:
        """The membrane leak ``α = exp(-1/τ)`` (what :func:`rtrl_jax.rflo` reads by default)."""
        return math.exp(-1.0 / float(self.tau))

    @property
    def num_feature_axes(self) -> int:
        return 1

    def _check(self) -> None:
        if float(self.tau) <= 0 or float(self.threshold) <= 0:
            raise ValueError(f"{type(self).__name__}: tau and threshold must be positive.")
        if int(self.refractory) != self.refractory or self.refractory < 0:
            raise ValueError(
                f"{type(self).__name__}: refractory must be an integer >= 0, got {self.refractory!r}."
            )

    def _membrane(self, v: jax.Array, z: jax.Array, inputs: jax.Array) -> jax.Array:
        """``α v + W_in x + W_rec z − z v_th``."""
        current = nn.Dense(
            self.features,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            param_dtype=self.param_dtype,
            name="input",
        )(inputs)
        recurrent: nn.Module
        if self.self_connections:
            recurrent = nn.Dense(
                self.features,
                use_bias=False,
                kernel_init=self.recurrent_init,
                param_dtype=self.param_dtype,
                name="recurrent",
            )
        else:
            recurrent = _MaskedDense(self.features, self.recurrent_init, self.param_dtype, name="recurrent")
        reset = (jax.lax.stop_gradient(z) if self.detach_reset else z) * self.threshold
        return self.leak * v + current + recurrent(z) - reset

    def _spike(self, v: jax.Array, threshold: jax.Array, recent: jax.Array | None):
        """The new spikes (0 while refractory) and the new ``recent`` buffer."""
        u = (v - threshold) / self.threshold
        dampening = jnp.asarray(self.dampening, u.dtype)
        probing = probing_structure()  # the sparsity probes see every derivative that can be non-zero
        z = _spike_structural(u, dampening) if probing else spike(u, dampening)
        if recent is None:
            return z, None
        if not probing:
            z = jnp.where(jnp.any(recent > 0, axis=-2), jnp.zeros_like(z), z)
        recent = jnp.concatenate([z[..., None, :], recent[..., :-1, :]], axis=-2)
        return z, jax.lax.stop_gradient(recent)

    def _zeros(self, input_shape) -> tuple[jax.Array, jax.Array | None]:
        batch = tuple(input_shape)[:-1]
        zeros = jnp.zeros((*batch, self.features), self.param_dtype)
        recent = (
            jnp.zeros((*batch, self.refractory, self.features), self.param_dtype) if self.refractory else None
        )
        return zeros, recent


class LIFCell(_SpikingCell):
    """Leaky integrate-and-fire neurons (Bellec et al. 2020), reset by subtraction.

    ``v_{t+1} = α v_t + W_in x_{t+1} + W_rec z_t − z_t v_th``, ``z_{t+1} = H(v_{t+1} − v_th)`` with
    the pseudo-derivative ``ψ = (γ/v_th) max(0, 1 − |v − v_th|/v_th)`` (see the module docstring for
    the reset's gradient, refractoriness and self-connections).

    The carry is :class:`LIFState` ``(v, z[, recent])``; the output is the spike vector ``z``.

    Attributes:
      features: number of neurons.
      tau: membrane time constant ``τ_m`` in steps (``α = exp(-1/τ_m)``).
      threshold: ``v_th``.
      dampening: ``γ``, the height of the pseudo-derivative (0.3 in the paper).
      refractory: steps after a spike during which the neuron cannot spike (0: none).
      self_connections: keep the diagonal of ``W_rec`` (a plain ``nn.Dense``); ``False`` zeroes it.
      detach_reset: no gradient through the reset ``z v_th`` (the paper's eligibility traces).
      use_bias: a bias in the input ``Dense``.

    Example:
      >>> cell = LIFCell(32, tau=20.0, refractory=2)
      >>> core = rtrl_jax.from_linen(cell, input_size=3)
      >>> spikes = nn.RNN(cell)(jnp.ones((4, 100, 3)))   # (batch, time, features)
    """

    @nn.compact
    def __call__(self, carry: LIFState, inputs: jax.Array) -> tuple[LIFState, jax.Array]:
        self._check()
        v = self._membrane(carry.v, carry.z, inputs)
        z, recent = self._spike(v, jnp.asarray(self.threshold, v.dtype), carry.recent)
        return LIFState(v, z, recent), z

    def initialize_carry(self, rng, input_shape) -> LIFState:
        del rng
        zeros, recent = self._zeros(input_shape)
        return LIFState(zeros, zeros, recent)


class ALIFCell(_SpikingCell):
    """Adaptive leaky integrate-and-fire neurons (LSNN; Bellec et al. 2018, 2020).

    As :class:`LIFCell` with the adaptive threshold ``A_t = v_th + β a_t``,
    ``a_{t+1} = ρ a_t + z_t`` (``ρ = exp(-1/τ_a)``) and ``z_{t+1} = H(v_{t+1} − A_{t+1})``.

    The carry is :class:`ALIFState` ``(v, a, z[, recent])``; the output is the spike vector ``z``.

    Attributes:
      tau_adaptation: the adaptation time constant ``τ_a`` in steps.
      beta: the adaptation strength ``β``.

    The other attributes are :class:`LIFCell`'s.
    """

    tau_adaptation: float = 200.0
    beta: float = 1.8

    @property
    def adaptation_decay(self) -> float:
        """``ρ = exp(-1/τ_a)``."""
        return math.exp(-1.0 / float(self.tau_adaptation))

    @nn.compact
    def __call__(self, carry: ALIFState, inputs: jax.Array) -> tuple[ALIFState, jax.Array]:
        self._check()
        if float(self.tau_adaptation) <= 0:
            raise ValueError(f"ALIFCell: tau_adaptation must be positive, got {self.tau_adaptation}.")
        v = self._membrane(carry.v, carry.z, inputs)
        a = self.adaptation_decay * carry.a + carry.z
        z, recent = self._spike(v, self.threshold + self.beta * a, carry.recent)
        return ALIFState(v, a, z, recent), z

    def initialize_carry(self, rng, input_shape) -> ALIFState:
        del rng
        zeros, recent = self._zeros(input_shape)
        return ALIFState(zeros, zeros, zeros, recent)
