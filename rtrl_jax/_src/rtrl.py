"""Exact real-time recurrent learning (Williams & Zipser 1989) as forward-mode autodiff.

The trace is the influence matrix ``J_t = dh_t/dθ`` held as ``P`` stacked tangents of the flat carry
(an array of shape ``(P, S)``: row ``j`` is ``dh_t/dθ_j``). One step is

    J_t = I_t + D_t J_{t-1},

where ``D_t J_{t-1}`` is ``jax.vmap`` of the cell's linearisation in the carry (``jax.linearize``,
one JVP per stored tangent) and the immediate Jacobian ``I_t = ∂F/∂θ`` is built by reverse mode over
the ``S`` carry cotangents (``jax.vjp`` vmapped over the basis of the carry), so no ``P × P`` tangent
basis is ever formed. The gradient of a step loss with carry cotangent ``c_t`` is ``J_t c_t``; the
sum over ``t`` equals BPTT of ``Σ_t L_t``.

Cost per step for a dense RNN with ``n`` units and ``P ≈ n²`` parameters: ``O(n² P) = O(n⁴)`` time
and ``O(n P) = O(n³)`` memory.

Reference: R. J. Williams and D. Zipser, "A learning algorithm for continually running fully
recurrent neural networks", Neural Computation 1(2), 1989.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import CoreFn, Estimator, flatten_core


class RTRLState(NamedTuple):
    """Trace of exact RTRL.

    Attributes:
      influence: ``(P, S)`` array, ``influence[j] = d carry / d θ_j`` for the flat carry and params.
    """

    influence: jax.Array


def rtrl(core: CoreFn) -> Estimator:
    """Exact RTRL for ``core``.

    Args:
      core: a recurrent core ``(params, carry, x) -> (carry, out)`` for one stream.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`RTRLState`.

    Example:
      >>> est = rtrl(core)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x)
      >>> grads = est.grad(trace, params, carry_bar)   # exact d(carry_bar · h_t)/dθ
    """

    def init(params, carry, *, key=None):
        del key
        flat_params, _ = ravel_pytree(params)
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(flat_params, flat_carry)
        return RTRLState(jnp.zeros((flat_params.size, flat_carry.size), dtype))

    def step(trace, params, carry, x, *, key=None):
        del key
        flat = flatten_core(core, params, carry)
        flat_params, _ = ravel_pytree(params)
        flat_carry, _ = ravel_pytree(carry)
        (new_flat_carry, out), dynamics_jvp = jax.linearize(
            lambda h: flat.apply(flat_params, h, x), flat_carry
        )
        _, immediate_vjp = jax.vjp(lambda p: flat.apply(p, flat_carry, x)[0], flat_params)
        basis = jnp.eye(new_flat_carry.size, dtype=new_flat_carry.dtype)
        (immediate,) = jax.vmap(immediate_vjp)(basis)  # (S, P): row i is d h_i / dθ
        propagated, _ = jax.vmap(dynamics_jvp)(trace.influence)  # (P, S): D_t J_{t-1}
        influence = propagated + immediate.T.astype(propagated.dtype)
        return flat.unravel_carry(new_flat_carry), out, RTRLState(influence)

    def grad(trace, params, carry_bar):
        _, unravel_params = ravel_pytree(params)
        flat_carry_bar, _ = ravel_pytree(carry_bar)
        return unravel_params(trace.influence @ flat_carry_bar.astype(trace.influence.dtype))

    return Estimator(init, step, grad)
