"""Recurrent cells that ship with the library: element-wise recurrences and sparse recurrent kernels.

All cells are ``flax.linen`` modules with the ``RNNCellBase`` conventions
(``cell(carry, x) -> (carry, out)``, ``cell.initialize_carry(rng, input_shape)``,
``num_feature_axes``), so ``rtrl_jax.from_linen(cell, input_size)`` turns them into cores that every
estimator serves. Input projections are ``nn.Dense`` layers, so Kronecker-factored estimators find
them. Carries are real arrays (complex states are stored as real and imaginary parts), so every
estimator's real-valued trace applies.

- :class:`LRUCell`: a diagonal linear recurrence ``h_t = λ ⊙ h_{t-1} + γ ⊙ (B x_t)`` with complex or
  real ``λ`` (Orvieto et al. 2023). Its recurrence is element-wise, so SnAp-1 is exact for it
  (Zucchet et al. 2023).
- :class:`ELSTMCell`: an element-wise LSTM whose gates read the previous cell state through
  element-wise (diagonal) weights only (after Irie, Gopalakrishnan & Schmidhuber 2023). SnAp-1 is
  exact for it too.
- :class:`SparseRNNCell` and :class:`SparseGRUCell`: a vanilla RNN and a GRU whose recurrent kernels
  are multiplied by a fixed random 0/1 mask of a chosen density (Menick et al. 2020), which keeps
  SnAp-2 cheap.
- :class:`LeakyRNNCell`: ``h_t = α h_{t-1} + (1 - α) tanh(W h_{t-1} + U x_t + b)``, the leaky rate
  network of RFLO (Murray 2019) and of non-spiking e-prop (Bellec et al. 2020).

References: A. Orvieto et al., "Resurrecting recurrent neural networks for long sequences",
arXiv:2303.06349; N. Zucchet et al., "Online learning of long-range dependencies", arXiv:2305.15947;
K. Irie, A. Gopalakrishnan and J. Schmidhuber, "Exploring the promise and limits of real-time
recurrent learning", arXiv:2305.19044; J. Menick et al., "Practical real time recurrent learning
with a sparse approximation", arXiv:2006.07232; J. M. Murray, "Local online learning in recurrent
networks with random feedback", eLife 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _zeros_carry(input_shape: tuple[int, ...], size: int, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.zeros((*tuple(input_shape)[:-1], size), dtype)


def random_mask(
    shape: tuple[int, int], density: float, *, seed: int = 0, keep_diagonal: bool = False
) -> np.ndarray:
    """A fixed random 0/1 mask (NumPy, float) with about ``density`` of its entries set.

    Args:
      shape: ``(in, out)`` shape of the kernel to mask (Flax ``Dense`` layout).
      density: fraction of entries kept, in ``(0, 1]``.
      seed: NumPy seed; the same seed gives the same mask.
      keep_diagonal: also keep every self-connection ``(i, i)``.
    """
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}.")
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    if keep_diagonal:
        n = min(shape)
        mask[np.arange(n), np.arange(n)] = True
    return mask.astype(np.float64)


def _resolve_mask(mask: Any, shape: tuple[int, int], density: float, seed: int, keep_diag: bool):
    if mask is None:
        return random_mask(shape, density, seed=seed, keep_diagonal=keep_diag)
    mask = np.asarray(mask, np.float64)
    if mask.shape != shape:
        raise ValueError(f"recurrent mask has shape {mask.shape}, expected {shape}.")
    return (mask != 0).astype(np.float64)


class _VectorCarryCell(nn.RNNCellBase):
    """Shared by the cells below: a zero carry of ``state_size`` features, one feature axis."""

    @property
    def state_size(self) -> int:
        return self.features

    def initialize_carry(self, rng, input_shape):
        del rng
        return _zeros_carry(input_shape, self.state_size, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class LRUCell(_VectorCarryCell):
    """A diagonal linear recurrent unit (LRU, Orvieto et al. 2023) as a recurrent cell.

    ``h_t = λ ⊙ h_{t-1} + γ ⊙ (B x_t)`` with ``λ_k = exp(-exp(ν_k) + i exp(θ_k))`` (complex) or
    ``λ_k = exp(-exp(ν_k))`` (real), and the normalisation ``γ_k = exp(γ_log_k)`` initialised to
    ``sqrt(1 - |λ_k|²)``. ``|λ_k|`` is drawn uniformly in ``[r_min, r_max]`` on the ring and the
    phase in ``[0, max_phase]``. For a complex cell ``B = B_re + i B_im``.

    The carry is one real array: ``[Re h, Im h]`` (size ``2 * features``) for a complex cell,
    ``h`` for a real one, and the output is the carry. The LRU's output map
    ``y = Re(C h) + D x`` is linear in ``[Re h, Im h]``, so it belongs to the readout (or the next
    layer) and is not part of the cell.

    Attributes:
      features: number of (complex or real) units.
      complex_state: complex ``λ`` (default) or real ``λ``.
      r_min: lower end of the range of ``|λ|`` at initialisation.
      r_max: upper end of the range of ``|λ|`` at initialisation.
      max_phase: range of the phase of ``λ`` at initialisation.
    """

    features: int
    complex_state: bool = True
    r_min: float = 0.5
    r_max: float = 0.99
    max_phase: float = 2 * np.pi
    param_dtype: Any = jnp.float32

    @property
    def state_size(self) -> int:
        return 2 * self.features if self.complex_state else self.features

    @nn.compact
    def __call__(self, carry, inputs):
        n = self.features

        def nu_init(key, shape, dtype=self.param_dtype):
            u = jax.random.uniform(key, shape, dtype)
            radius_sq = u * (self.r_max**2 - self.r_min**2) + self.r_min**2
            return jnp.log(-0.5 * jnp.log(radius_sq))

        def theta_init(key, shape, dtype=self.param_dtype):
            u = jax.random.uniform(key, shape, dtype)
            return jnp.log(self.max_phase * u + 1e-3)

        nu_log = self.param("nu_log", nu_init, (n,))
        modulus = jnp.exp(-jnp.exp(nu_log))
        # γ starts at sqrt(1 - |λ|²) of the initial λ (Orvieto et al.'s normalisation), then learns.
        gamma_log = self.param(
            "gamma_log",
            lambda key, shape, dtype=self.param_dtype: 0.5 * jnp.log(1.0 - modulus**2).astype(dtype),
            (n,),
        )
        gamma = jnp.exp(gamma_log)
        b_re = nn.Dense(n, use_bias=False, param_dtype=self.param_dtype, name="B_re")(inputs)
        if self.complex_state:
            theta_log = self.param("theta_log", theta_init, (n,))
            phase = jnp.exp(theta_log)
            lam_re, lam_im = modulus * jnp.cos(phase), modulus * jnp.sin(phase)
            b_im = nn.Dense(n, use_bias=False, param_dtype=self.param_dtype, name="B_im")(inputs)
            h_re, h_im = carry[..., :n], carry[..., n:]
            new_re = lam_re * h_re - lam_im * h_im + gamma * b_re
            new_im = lam_re * h_im + lam_im * h_re + gamma * b_im
            new = jnp.concatenate([new_re, new_im], axis=-1)
        else:
            new = modulus * carry + gamma * b_re
        return new, new


class ELSTMCell(_VectorCarryCell):
    """An element-wise LSTM (eLSTM, after Irie, Gopalakrishnan & Schmidhuber 2023).

    The gates read the input through full ``Dense`` layers but the previous cell state only through
    element-wise weights, so the recurrence is diagonal and SnAp-1 is exact::

        f_t = σ(F x_t + w_f ⊙ c_{t-1} + b_f)          forget gate
        z_t = tanh(Z x_t + w_z ⊙ c_{t-1} + b_z)       candidate
        o_t = σ(O x_t + w_o ⊙ c_{t-1} + b_o)          output gate
        c_t = f_t ⊙ c_{t-1} + (1 - f_t) ⊙ z_t
        h_t = o_t ⊙ c_t

    The carry is ``(c, h)`` as for Flax's LSTM cells; the output is ``h``, which the next step does
    not read.

    Attributes:
      features: number of units.
      forget_bias: initial bias of the forget gate (positive: long memory at initialisation).
    """

    features: int
    forget_bias: float = 1.0
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    recurrent_init: Callable[..., Any] = nn.initializers.uniform(scale=1.0)
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, inputs):
        c, _ = carry
        n = self.features

        def gate(name, bias):
            dense = nn.Dense(
                n,
                kernel_init=self.kernel_init,
                bias_init=nn.initializers.constant(bias),
                param_dtype=self.param_dtype,
                name=name,
            )
            w = self.param(f"w_{name}", self.recurrent_init, (n,), self.param_dtype)
            return dense(inputs) + w * c

        f = jax.nn.sigmoid(gate("f", self.forget_bias))
        z = jnp.tanh(gate("z", 0.0))
        o = jax.nn.sigmoid(gate("o", 0.0))
        new_c = f * c + (1.0 - f) * z
        new_h = o * new_c
        return (new_c, new_h), new_h

    def initialize_carry(self, rng, input_shape):
        del rng
        zeros = _zeros_carry(input_shape, self.features, self.param_dtype)
        return zeros, zeros


class SparseRNNCell(_VectorCarryCell):
    """A vanilla RNN ``h_t = tanh((W ⊙ M) h_{t-1} + U x_t + b)`` with a fixed 0/1 mask ``M``.

    The recurrent kernel ``W`` is a full parameter (Flax ``Dense`` layout ``(in, out)``: entry
    ``[j, i]`` is unit ``i`` reading unit ``j``); the masked-out entries never influence anything,
    get zero gradients, and SnAp does not track them. With ``density`` ``d`` each unit reads about
    ``d·n`` units, so SnAp-2's trace holds about ``d·n`` entries per weight (Menick et al. 2020).

    Attributes:
      features: number of units.
      density: fraction of recurrent connections kept (ignored when ``mask`` is given).
      seed: NumPy seed of the mask.
      mask: an explicit ``(features, features)`` 0/1 mask in ``Dense`` layout ``(in, out)``, or
        ``None`` to draw one (a tuple of tuples keeps the module hashable).
      keep_diagonal: always keep the self-connections.
    """

    features: int
    density: float = 0.1
    seed: int = 0
    mask: Any = None
    keep_diagonal: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    recurrent_init: Callable[..., Any] = nn.initializers.orthogonal()
    param_dtype: Any = jnp.float32

    def recurrent_mask(self) -> np.ndarray:
        """The fixed mask in ``Dense`` layout ``(in, out)``."""
        shape = (self.features, self.features)
        return _resolve_mask(self.mask, shape, self.density, self.seed, self.keep_diagonal)

    @nn.compact
    def __call__(self, carry, inputs):
        n = self.features
        kernel = self.param("recurrent_kernel", self.recurrent_init, (n, n), self.param_dtype)
        mask = jnp.asarray(self.recurrent_mask(), kernel.dtype)
        scale = float(1.0 / np.sqrt(max(float(np.mean(self.recurrent_mask())), 1e-12)))
        recurrent = carry @ (scale * kernel * mask)
        inp = nn.Dense(n, kernel_init=self.kernel_init, param_dtype=self.param_dtype, name="input")
        new = jnp.tanh(recurrent + inp(inputs))
        return new, new


class SparseGRUCell(_VectorCarryCell):
    """A GRU (Flax ``GRUCell`` equations) whose three recurrent kernels are masked by fixed masks.

    ``r = σ(W_ir x + (W_hr ⊙ M_r) h + b_r)``, ``z = σ(W_iz x + (W_hz ⊙ M_z) h + b_z)``,
    ``n = tanh(W_in x + b_in + r ⊙ ((W_hn ⊙ M_n) h + b_hn))``, ``h' = (1 - z) ⊙ n + z ⊙ h``.
    The masks are drawn at ``density`` from ``seed`` (one per gate). SnAp-1 of a GRU is
    already exact on the diagonal path ``z ⊙ h``; sparse kernels make SnAp-2 cheap.

    Attributes:
      features: number of units.
      density: fraction of recurrent connections kept per kernel.
      seed: NumPy seed of the masks.
      keep_diagonal: always keep the self-connections.
    """

    features: int
    density: float = 0.1
    seed: int = 0
    keep_diagonal: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    recurrent_init: Callable[..., Any] = nn.initializers.orthogonal()
    param_dtype: Any = jnp.float32

    def recurrent_masks(self) -> dict[str, np.ndarray]:
        """The fixed masks of the ``r``, ``z`` and ``n`` recurrent kernels (layout ``(in, out)``)."""
        shape = (self.features, self.features)
        return {
            gate: random_mask(shape, self.density, seed=self.seed + i, keep_diagonal=self.keep_diagonal)
            for i, gate in enumerate("rzn")
        }

    @nn.compact
    def __call__(self, carry, inputs):
        n = self.features
        masks = self.recurrent_masks()

        def recurrent(gate, use_bias):
            kernel = self.param(f"h{gate}_kernel", self.recurrent_init, (n, n), self.param_dtype)
            scale = float(1.0 / np.sqrt(max(float(np.mean(masks[gate])), 1e-12)))
            out = carry @ (scale * kernel * jnp.asarray(masks[gate], kernel.dtype))
            if use_bias:
                out = out + self.param(f"h{gate}_bias", nn.initializers.zeros, (n,), self.param_dtype)
            return out

        def dense(gate):
            return nn.Dense(n, kernel_init=self.kernel_init, param_dtype=self.param_dtype, name=f"i{gate}")(
                inputs
            )

        r = jax.nn.sigmoid(dense("r") + recurrent("r", False))
        z = jax.nn.sigmoid(dense("z") + recurrent("z", False))
        cand = jnp.tanh(dense("n") + r * recurrent("n", True))
        new = (1.0 - z) * cand + z * carry
        return new, new


class LeakyRNNCell(_VectorCarryCell):
    """A leaky rate network ``h_t = α h_{t-1} + (1 - α) tanh(W h_{t-1} + U x_t + b)``, ``α = 1 - 1/τ``.

    The network of RFLO (Murray 2019) and of e-prop for non-spiking leaky units (Bellec et al.
    2020). Pair it with ``rflo(core, leak=1 - 1/tau)``.

    Attributes:
      features: number of units.
      tau: the time constant ``τ ≥ 1`` in steps (``τ = 1``: no leak, a vanilla RNN).
    """

    features: int
    tau: float = 2.0
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    recurrent_init: Callable[..., Any] = nn.initializers.orthogonal()
    param_dtype: Any = jnp.float32

    @property
    def leak(self) -> float:
        """``α = 1 - 1/τ``."""
        return 1.0 - 1.0 / float(self.tau)

    @nn.compact
    def __call__(self, carry, inputs):
        if float(self.tau) < 1.0:
            raise ValueError(f"LeakyRNNCell tau must be >= 1, got {self.tau}.")
        n = self.features
        rec = nn.Dense(
            n,
            use_bias=False,
            kernel_init=self.recurrent_init,
            param_dtype=self.param_dtype,
            name="recurrent",
        )
        inp = nn.Dense(n, kernel_init=self.kernel_init, param_dtype=self.param_dtype, name="input")
        new = self.leak * carry + (1.0 - self.leak) * jnp.tanh(rec(carry) + inp(inputs))
        return new, new
