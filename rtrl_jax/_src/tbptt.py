"""Backpropagation through time: full BPTT over a sequence and truncated BPTT as an online estimator.

BPTT is the reference every online method is compared with: ``jax.grad`` through ``jax.lax.scan``.
:func:`unroll` runs a core over a sequence and :func:`bptt_value_and_grad` differentiates the summed
per-step loss through it.

Truncated BPTT (Williams & Peng 1990) keeps no influence matrix: its trace is a buffer of the last
``k`` inputs and the carries before them, and the gradient of a step loss is reverse mode through that
window only, ``c_t · Σ_{s=t-k+1..t} (Π_{r=s+1..t} D_r) I_s``. Two windows are offered:

- ``aligned=False`` (sliding): every step looks back ``k`` steps;
- ``aligned=True``: windows ``[mk+1, (m+1)k]`` as in classic TBPTT, where a step looks back only to the
  start of its window. Summing the per-step gradients over a window (``optax.MultiSteps`` with
  ``every_k_schedule=k``) gives the classic TBPTT(k) update; with ``k`` the sequence length, BPTT.

Cost per step: ``O(k)`` core steps forward and backward; memory ``O(k (S + input))``.

Reference: R. J. Williams and J. Peng, "An efficient gradient-based algorithm for on-line training of
recurrent network trajectories", Neural Computation 2(4), 1990.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rtrl_jax._src.base import Carry, CoreFn, Estimator, Params
from rtrl_jax._src.registry import register


class TBPTTState(NamedTuple):
    """Trace of truncated BPTT: the window, newest step last.

    Attributes:
      carries: carries before each buffered step, leading axis ``k``.
      inputs: the buffered inputs, leading axis ``k``.
      valid: ``(k,)`` bool, which slots hold a step of the current window.
    """

    carries: Carry
    inputs: Any
    valid: jax.Array


def unroll(core: CoreFn, params: Params, carry: Carry, xs: Any) -> tuple[Carry, Any]:
    """Runs ``core`` over the leading axis of ``xs`` with ``jax.lax.scan``.

    Returns:
      ``(final_carry, outs)`` with ``outs`` stacked along the leading axis.
    """
    return jax.lax.scan(lambda h, x: core(params, h, x), carry, xs)


def bptt_value_and_grad(
    core: CoreFn,
    loss_fn: Callable[[Params, Any, Any], jax.Array],
    params: Params,
    carry: Carry,
    xs: Any,
    targets: Any,
) -> tuple[jax.Array, Params]:
    """Full BPTT: ``jax.value_and_grad`` of ``Σ_t loss_fn(params, out_t, y_t)`` through ``lax.scan``.

    Args:
      core: the recurrent core.
      loss_fn: ``(params, out, target) -> scalar`` loss of one step; it receives the same ``params``
        so a readout stored in them is trained too.
      params: parameters.
      carry: the carry before the first step.
      xs: inputs, leading axis time.
      targets: targets, leading axis time.

    Returns:
      ``(summed loss, gradient)``.
    """

    def total_loss(p):
        _, outs = unroll(core, p, carry, xs)
        return jnp.sum(jax.vmap(lambda o, y: loss_fn(p, o, y))(outs, targets))

    return jax.value_and_grad(total_loss)(params)


def _stack(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda a: jnp.zeros((k, *jnp.shape(a)), jnp.result_type(a)), tree)


def _push(stack: Any, item: Any) -> Any:
    """Drops the oldest slot of ``stack`` and appends ``item`` as the newest."""
    return jax.tree.map(lambda s, a: jnp.concatenate([s[1:], jnp.asarray(a, s.dtype)[None]]), stack, item)


def tbptt(
    core: CoreFn,
    window: int = 10,
    *,
    aligned: bool = False,
    input_spec: jax.ShapeDtypeStruct | None = None,
) -> Estimator:
    """Truncated BPTT with a window of ``window`` steps, as an online estimator.

    Args:
      core: a recurrent core for one stream.
      window: the truncation ``k ≥ 1``; ``k = 1`` keeps only the immediate term ``c_t · I_t``.
      aligned: classic TBPTT windows (see the module docstring) instead of a sliding window.
      input_spec: shape and dtype of one input, for the input buffer. Defaults to the
        ``input_shape`` of a :class:`~rtrl_jax.Core` with the carry's dtype.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`TBPTTState`.
    """
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"tbptt window must be an integer >= 1, got {window!r}.")

    if input_spec is None and not hasattr(core, "input_shape"):
        raise ValueError("tbptt needs input_spec= for a core that is not an rtrl_jax.Core.")

    def init(params, carry, *, key=None):
        del params, key
        spec = input_spec
        if spec is None:
            dtype = jnp.result_type(*jax.tree.leaves(carry))
            spec = jax.ShapeDtypeStruct(core.input_shape, dtype)
        inputs = jnp.zeros((window, *spec.shape), spec.dtype)
        return TBPTTState(_stack(carry, window), inputs, jnp.zeros((window,), bool))

    def step(trace, params, carry, x, *, key=None):
        del key
        new_carry, out = core(params, carry, x)
        valid = trace.valid
        if aligned:
            valid = jnp.where(valid[0], jnp.zeros_like(valid), valid)
        new_trace = TBPTTState(
            carries=_push(trace.carries, carry),
            inputs=_push(trace.inputs, x),
            valid=jnp.concatenate([valid[1:], jnp.ones((1,), bool)]),
        )
        return new_carry, out, new_trace

    def grad(trace, params, carry_bar):
        first = jnp.argmax(trace.valid)
        start = jax.tree.map(lambda c: c[first], trace.carries)

        def window_carry(p):
            def body(h, slot):
                x, is_valid = slot
                new_h, _ = core(p, h, x)
                return jax.tree.map(lambda a, b: jnp.where(is_valid, a, b), new_h, h), None

            final, _ = jax.lax.scan(body, start, (trace.inputs, trace.valid))
            return final

        _, vjp = jax.vjp(window_carry, params)
        return vjp(carry_bar)[0]

    return Estimator(init, step, grad)


register("tbptt", tbptt, summary="truncated BPTT over a sliding (or aligned) window of k steps")
