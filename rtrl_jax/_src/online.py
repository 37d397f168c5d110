"""From a step loss to an online parameter gradient, and the ``custom_vjp`` drop-in.

A step's loss ``L_t`` depends on the step output ``out_t = output(h_t)`` (and possibly on the carry
``h_t`` itself). Its cotangent is pulled back onto the carry, ``c_t = ∂L_t/∂h_t``, and the estimator
turns ``c_t`` into the gradient estimate ``c_t · J_t``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from rtrl_jax._src.base import Carry, Estimator, Input, Output, Params, PRNGKey, Trace


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


def rollout(
    estimator: Estimator,
    params: Params,
    carry: Carry,
    inputs: Input,
    *,
    key: PRNGKey | None = None,
    emit: Callable[[Carry, Output, Trace], Any] | None = None,
    cotangent: Callable[[Carry, Output], Carry] | None = None,
) -> tuple[Carry, Trace, Any]:
    """Runs ``estimator`` from a fresh trace over a stream with fixed parameters, in ``lax.scan``.

    The random keys follow one convention: ``init`` gets ``fold_in(key, 0)`` and step ``t`` the
    ``t``-th of ``split(fold_in(key, 1), T)``; without ``key`` every call gets ``None`` (for
    deterministic estimators).

    Args:
      estimator: any estimator.
      params: the core's parameters (held fixed).
      carry: the initial carry.
      inputs: the stream's inputs, leading axis time ``T``.
      key: the random key of the run, or ``None``.
      emit: ``(carry, out, trace) -> y``, evaluated after every step; the ``y`` are stacked along
        a leading time axis (e.g. the per-step online gradient of a step loss).
      cotangent: ``(carry, out) -> carry_bar``, the cotangent ``c_t = ∂L_t/∂h_t`` of the step
        loss; with it the trace observes every step's (``estimator.observe``, after ``emit``), as
        in training. Estimators that learn from the loss (DNI) need it; without it what they have
        learned stays as ``init`` set it.

    Returns:
      ``(final carry, final trace, emitted)``, ``emitted`` ``None`` without ``emit``. Pure; jit it.

    Example::

        def step_grad(carry, out, trace):
            return online_grad(core, est, trace, params, carry, jax.grad(loss)(out))

        carry, trace, grads = rollout(est, params, carry, xs, key=key, emit=step_grad)
    """
    num_steps = jax.tree.leaves(inputs)[0].shape[0]
    init_key = None if key is None else jax.random.fold_in(key, 0)
    step_keys = None if key is None else jax.random.split(jax.random.fold_in(key, 1), num_steps)

    def body(state, step):
        carry, trace = state
        x, step_key = step
        carry, out, trace = estimator.step(trace, params, carry, x, key=step_key)
        emitted = None if emit is None else emit(carry, out, trace)
        if cotangent is not None:
            trace = estimator.observe(trace, params, cotangent(carry, out))
        return (carry, trace), emitted

    trace = estimator.init(params, carry, key=init_key)
    (carry, trace), emitted = jax.lax.scan(body, (carry, trace), (inputs, step_keys))
    return carry, trace, emitted


def online_step(core: Any, estimator: Estimator):
    """The drop-in: a step function whose reverse-mode derivative is the online gradient.

    ``online_step(core, estimator)(params, trace, carry, x, key)`` returns
    ``(carry, out, trace)`` like ``estimator.step``. Under ``jax.grad`` (or ``jax.value_and_grad``)
    of any loss ``L_t`` of ``out`` and the new carry ``h_t = F(h_{t-1}, x_t; θ)``, with
    ``c_t = ∂L_t/∂h_t`` (:func:`carry_cotangent`):

    - ``params`` get the estimator's online gradient ``c_t · J_t`` (``J_t ≈ dh_t/dθ``, the trace);
    - ``x`` gets ``c_t · ∂F/∂x_t``, the immediate input Jacobian (one VJP of the core at
      ``(params, h_{t-1}, x_t)``), so whatever produced ``x`` at this step (an encoder, an embedding,
      the online layers below) trains too;
    - ``trace``, ``carry`` and ``key`` get zero: nothing flows into past steps (the past's influence
      on ``h_t`` through ``θ`` is what ``J_t`` already holds; the past's influence through ``x`` is
      what a layer-by-layer online model drops, see :mod:`rtrl_jax._src.layers`).

    The reverse pass can hand back cotangents only, not a new trace, so the drop-in does not call
    ``estimator.observe``: an estimator that learns from the loss (DNI) keeps what it has learned
    as it is, unless the loop calls ``estimator.observe(trace, params, c_t)`` itself
    (:func:`carry_cotangent` gives ``c_t``).

    A user's unchanged one-step loss thus trains online::

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
        return (new_carry, out, new_trace), (new_trace, params, carry, x, new_carry)

    def step_bwd(residuals, cotangents):
        new_trace, params, carry, x, new_carry = residuals
        carry_bar, out_bar, _ = cotangents
        c = carry_cotangent(core, new_carry, out_bar, carry_bar)
        params_bar = estimator.grad(new_trace, params, c)
        _, input_vjp = jax.vjp(lambda x: core(params, carry, x)[0], x)
        (x_bar,) = input_vjp(c)
        return params_bar, None, None, x_bar, None

    step.defvjp(step_fwd, step_bwd)
    return step
