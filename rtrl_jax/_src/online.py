"""From a step loss to an online parameter gradient, and the ``custom_vjp`` drop-in.

A step's loss ``L_t`` depends on the step output ``out_t = output(h_t)`` (and possibly on the carry
``h_t`` itself). Its cotangent is pulled back onto the carry, ``c_t = ∂L_t/∂h_t``, and the estimator
turns ``c_t`` into the gradient estimate ``c_t · J_t``.
"""

from __future__ import annotations

from typing import Any

import jax

from rtrl_jax._src.base import Carry, Estimator, Params, Trace


def carry_cotangent(core: Any, carry: Carry, out_bar: Any, carry_bar: Carry | None = None) -> Carry:
    """Pulls a cotangent on the step output back onto the carry it was read from.

    Args:
      core: a :class:`~rtrl_jax.Core` (its ``output`` maps the carry to the output).
      carry: the new carry ``h_t``.
      out_bar: ``∂L_t/∂out_t``.
      carry_bar: an extra cotangent on ``h_t`` when the loss also reads the carry directly.

    Returns:
      ``∂L_t/∂h_t``.
    """
    _, output_vjp = jax.vjp(core.output, carry)
    (pulled,) = output_vjp(out_bar)
    if carry_bar is None:
        return pulled
    return jax.tree.map(lambda a, b: a + b, pulled, carry_bar)


def online_grad(
    core: Any,
    estimator: Estimator,
    trace: Trace,
    params: Params,
    carry: Carry,
    out_bar: Any,
    carry_bar: Carry | None = None,
) -> Params:
    """The estimator's gradient of a step loss with cotangents ``out_bar`` (and ``carry_bar``).

    ``trace`` and ``carry`` are those returned by the same ``estimator.step``.
    """
    return estimator.grad(trace, params, carry_cotangent(core, carry, out_bar, carry_bar))


def online_step(core: Any, estimator: Estimator):
    """The drop-in: a step function whose reverse-mode derivative is the online gradient.

    ``online_step(core, estimator)(params, trace, carry, x, key)`` returns
    ``(carry, out, trace)`` like ``estimator.step``; under ``jax.grad`` (or ``jax.value_and_grad``)
    of any loss of ``out`` and the new carry, the derivative with respect to ``params`` is the
    estimator's online gradient ``c_t · J_t``, and nothing flows into the past (the cotangents of
    ``trace``, ``carry``, ``x`` and ``key`` are zero). A user's unchanged one-step loss thus trains
    online::

        step = online_step(core, rtrl(core))

        def loss(params, head, trace, carry, x, y):
            carry, out, trace = step(params, trace, carry, x, None)
            return xent(head @ out, y), (carry, trace)

        (value, (carry, trace)), grads = jax.value_and_grad(loss, has_aux=True)(...)

    Args:
      core: a :class:`~rtrl_jax.Core`.
      estimator: an estimator built for ``core``.

    Returns:
      ``step(params, trace, carry, x, key) -> (carry, out, trace)``; ``key`` may be ``None`` for
      deterministic estimators.
    """

    @jax.custom_vjp
    def step(params, trace, carry, x, key):
        return estimator.step(trace, params, carry, x, key=key)

    def step_fwd(params, trace, carry, x, key):
        new_carry, out, new_trace = estimator.step(trace, params, carry, x, key=key)
        return (new_carry, out, new_trace), (new_trace, params, new_carry)

    def step_bwd(residuals, cotangents):
        new_trace, params, new_carry = residuals
        carry_bar, out_bar, _ = cotangents
        params_bar = online_grad(core, estimator, new_trace, params, new_carry, out_bar, carry_bar)
        return params_bar, None, None, None, None

    step.defvjp(step_fwd, step_bwd)
    return step
