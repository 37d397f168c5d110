"""DNI: synthetic gradients (Jaderberg et al. 2017), as an online estimator for any core.

The gradient of the whole loss ``L = Σ_t L_t`` splits over the steps at which the parameters act:

    dL/dθ = Σ_t g_t · I_t,      g_t = ∂L/∂h_t = c_t + f_t,      f_t = ∂L_{>t}/∂h_t,

with ``c_t = ∂L_t/∂h_t`` the cotangent of the step's own loss, ``I_t = ∂F/∂θ`` the immediate
Jacobian at ``(h_{t-1}, x_t)`` and ``f_t`` the gradient of all *future* losses with respect to the
state. RTRL carries the past forward (``J_t``); DNI instead predicts the future: a linear map of the
carry, the *synthetic gradient*

    f̂_t = A h_t + b ≈ f_t        (A: S × S, b: S),

gives every step the estimate ``(c_t + f̂_t) · I_t``: one VJP of the core, no influence matrix.

**Learning A and b by bootstrapping.** The future gradient obeys ``f_{t-1} = (c_t + f_t) D_t``
(``D_t = ∂h_t/∂h_{t-1}``), so once ``c_t`` is known the prediction made one step earlier gets the
target (temporal-difference learning, with the later prediction standing in for the rest of the
future)

    f*_{t-1} = (c_t + λ f̂_t) D_t,       e_t = f̂_{t-1} - f*_{t-1},
    A ← A - η̃ e_t h_{t-1}ᵀ,    b ← b - η̃ e_t,      η̃ = η / (1 + ‖h_{t-1}‖²),

one step on ``½ ‖f̂_{t-1} - f*_{t-1}‖²`` with the target held fixed: SGD normalised by the squared
norm of the features ``[h_{t-1}; 1]`` (normalised LMS), so that one ``η`` serves carries of any
scale (a spiking cell's voltages reach tens) and the regression alone is stable for ``0 < η < 2``. With
``λ = 1`` the fixed point is the future gradient itself: where ``f_t`` is an affine function of
``h_t`` (a linear network whose future inputs are independent of its past), ``f̂ = f`` makes every
expected error zero. ``λ < 1`` learns the discounted future ``∂/∂h_t Σ_{k≥1} λ^{k-1} L_{t+k}``, a
shorter horizon (finite where the undiscounted sum is not, e.g. a state that never decays).

``c_t`` exists only after the step's loss, so the update is :attr:`Estimator.observe
<rtrl_jax.Estimator>`: the training loop calls ``observe(trace, params, c_t)`` after ``grad``. The
trace keeps ``h_t``, ``h_{t-1}`` and ``x_t``, from which ``grad`` takes its VJP for ``I_t`` and
``observe`` its VJP for ``D_t``. The loops of the library call ``observe`` (:func:`~rtrl_jax.rollout`
with ``cotangent=``, the trainer, the comparison tool); the ``custom_vjp`` drop-in cannot (its
reverse pass returns cotangents, not a trace), so the online layers of a whole model refuse DNI.
``grad`` is affine in its cotangent, not linear: it adds ``f̂_t`` once per call, so a loop calls it
once per step with the step's whole cotangent (and :func:`~rtrl_jax.influence_matrix` does not
describe it). With ``A = 0, b = 0`` (the start, as in
Jaderberg et al., whose last synthetic-gradient layer starts at zero) the estimate is the
immediate term ``c_t · I_t`` of truncated BPTT with a window of one step.

This is the form in the unified framework of Marschall, Cho & Savin (2020), with the state's own
cotangent ``c_t`` added exactly rather than predicted; their ``ã = [a; y*; 1]`` also feeds the label
to the map, which an estimator does not see. Per step: a forward pass and two VJPs of the core,
``O(S²)`` more arithmetic; trace ``S² + 3S`` numbers and one input. ``A`` and ``b`` are per stream
(under ``jax.vmap`` every stream learns its own). They start from zero in ``init`` only: at an
episode start the loops call :attr:`Estimator.restart <rtrl_jax.Estimator>`, which keeps them and
starts the last carries and input again as ``init`` does, so the map learned in one episode serves
the next.

References: M. Jaderberg, W. M. Czarnecki, S. Osindero, O. Vinyals, A. Graves, D. Silver and
K. Kavukcuoglu, "Decoupled neural interfaces using synthetic gradients", ICML 2017,
arXiv:1608.05343; O. Marschall, K. Cho and C. Savin, "A unified framework of online learning
algorithms for training recurrent neural networks", JMLR 21(135), 2020, arXiv:1907.02649.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.registry import register


class DNIState(NamedTuple):
    """Trace of DNI: the synthetic-gradient map and the last step it acts on.

    Attributes:
      weights: ``(S, S)`` the learned ``A`` on the flat carry.
      bias: ``(S,)`` the learned ``b``.
      carry: ``(S,)`` the flat carry ``h_t`` after the last step.
      previous_carry: ``(S,)`` the flat carry ``h_{t-1}`` before it.
      input: ``x_t``, the last step's input.
    """

    weights: jax.Array
    bias: jax.Array
    carry: jax.Array
    previous_carry: jax.Array
    input: Any


class SyntheticGradientUpdate(NamedTuple):
    """One bootstrapped step of the synthetic-gradient map (:func:`synthetic_gradient_update`)."""

    weights: jax.Array
    bias: jax.Array
    loss: jax.Array


def synthetic_gradient(weights: jax.Array, bias: jax.Array, carry: jax.Array) -> jax.Array:
    """``f̂ = A h + b``, the predicted gradient of the future losses with respect to the carry ``h``."""
    return weights @ carry + bias


def synthetic_gradient_update(
    weights: jax.Array,
    bias: jax.Array,
    carry: jax.Array,
    target: jax.Array,
    learning_rate: float,
) -> SyntheticGradientUpdate:
    """One normalised SGD step of ``A``, ``b`` on ``½ ‖A h + b - f*‖²``, the target ``f*`` held fixed:
    the gradient step ``η / (1 + ‖h‖²)`` (normalised LMS on the features ``[h; 1]``).

    Args:
      weights: ``A`` ``(S, S)``.
      bias: ``b`` ``(S,)``.
      carry: ``h_{t-1}`` ``(S,)``, where the prediction was made.
      target: ``f*_{t-1} = (c_t + λ f̂_t) D_t`` ``(S,)``.
      learning_rate: ``η``.

    Returns:
      :class:`SyntheticGradientUpdate` with the new ``A``, ``b`` and the loss before the step.
    """
    error = synthetic_gradient(weights, bias, carry) - target
    step = learning_rate / (1 + jnp.sum(carry**2))
    return SyntheticGradientUpdate(
        weights=weights - step * jnp.outer(error, carry),
        bias=bias - step * error,
        loss=0.5 * jnp.sum(error**2),
    )


def dni(
    core: Any,
    *,
    synthetic_learning_rate: float = 0.03,
    discount: float = 1.0,
    input_spec: jax.ShapeDtypeStruct | None = None,
) -> Estimator:
    """DNI (Jaderberg et al. 2017): ``(c_t + A h_t + b) · I_t``, ``A``, ``b`` bootstrapped online.

    Args:
      core: a recurrent core for one stream.
      synthetic_learning_rate: ``η``, the normalised learning rate of ``A`` and ``b`` (``0``
        freezes them; named apart from the model's learning rate, which configs and benchmarks also
        set).
      discount: ``λ ∈ [0, 1]``, the weight of the bootstrapped future in the target; ``1``
        predicts the whole future gradient.
      input_spec: shape and dtype of one input, for the stored input. Defaults to the
        ``input_shape`` of a :class:`~rtrl_jax.Core` with the carry's dtype.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`DNIState`; its ``observe`` learns
      ``A`` and ``b`` from the step's cotangent and its ``restart`` keeps them.

    Example:
      >>> est = dni(core, synthetic_learning_rate=0.1)
      >>> carry, out, trace = est.step(trace, params, carry, x)
      >>> c = carry_cotangent(core, carry, jax.grad(loss)(out))
      >>> grads = est.grad(trace, params, c)          # (c + A h_t + b) · I_t
      >>> trace = est.observe(trace, params, c)       # A, b learn from c_t
    """
    if not float(synthetic_learning_rate) >= 0:
        raise ValueError(f"dni's synthetic_learning_rate must be >= 0, got {synthetic_learning_rate!r}.")
    if not 0 <= float(discount) <= 1:
        raise ValueError(f"dni's discount must lie in [0, 1], got {discount!r}.")
    if input_spec is None and not hasattr(core, "input_shape"):
        raise ValueError("dni needs input_spec= for a core that is not an rtrl_jax.Core.")

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(*jax.tree.leaves(params), flat_carry)
        spec = input_spec or jax.ShapeDtypeStruct(core.input_shape, flat_carry.dtype)
        size = flat_carry.size
        return DNIState(  # every leaf its own array, so that a donated trace donates each once
            weights=jnp.zeros((size, size), dtype),
            bias=jnp.zeros((size,), dtype),
            carry=jnp.array(flat_carry, dtype),
            previous_carry=jnp.array(flat_carry, dtype),
            input=jnp.zeros(spec.shape, spec.dtype),
        )

    def step(trace, params, carry, x, *, key=None):
        del key
        new_carry, out = core(params, carry, x)
        new_trace = DNIState(
            weights=trace.weights,
            bias=trace.bias,
            carry=ravel_pytree(new_carry)[0].astype(trace.carry.dtype),
            previous_carry=ravel_pytree(carry)[0].astype(trace.carry.dtype),
            input=jnp.asarray(x, trace.input.dtype),
        )
        return new_carry, out, new_trace

    def last_step_vjp(trace, params, carry_bar):
        """The VJP of the last step ``(θ, h_{t-1}) -> h_t`` and the flat cotangent's unravel."""
        flat_bar, unravel = ravel_pytree(carry_bar)
        previous = unravel(trace.previous_carry.astype(flat_bar.dtype))
        _, vjp = jax.vjp(lambda p, h: core(p, h, trace.input)[0], params, previous)
        return vjp, flat_bar, unravel

    def grad(trace, params, carry_bar):
        vjp, flat_bar, unravel = last_step_vjp(trace, params, carry_bar)
        future = synthetic_gradient(trace.weights, trace.bias, trace.carry)
        params_bar, _ = vjp(unravel(flat_bar + future.astype(flat_bar.dtype)))
        return params_bar

    def observe(trace, params, carry_bar):
        vjp, flat_bar, unravel = last_step_vjp(trace, params, carry_bar)
        future = synthetic_gradient(trace.weights, trace.bias, trace.carry)
        _, previous_bar = vjp(unravel(flat_bar + discount * future.astype(flat_bar.dtype)))
        target = ravel_pytree(previous_bar)[0].astype(trace.weights.dtype)
        update = synthetic_gradient_update(
            trace.weights, trace.bias, trace.previous_carry, target, synthetic_learning_rate
        )
        return trace._replace(weights=update.weights, bias=update.bias)

    def restart(trace, params, carry, *, key=None):
        return init(params, carry, key=key)._replace(weights=trace.weights, bias=trace.bias)

    return Estimator(init, step, grad, observe, restart)


register(
    "dni",
    dni,
    summary="DNI: immediate Jacobian times the cotangent plus a learned synthetic future gradient",
    example_options={"synthetic_learning_rate": 0.1},
)
