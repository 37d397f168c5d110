"""Unbiased Online Recurrent Optimization (UORO), for any recurrent core.

The influence matrix is kept as one rank-one product ``J_t ≈ s̃ θ̃ᵀ`` (``s̃ ∈ R^S`` on the flat
carry, ``θ̃ ∈ R^P`` on the flat parameters). One step with random signs ``ν ∈ {±1}^S``:

    s' = D_t s̃                          (one forward-mode jax.jvp of the cell in the carry)
    ν̄  = νᵀ I_t = νᵀ ∂F/∂θ              (one reverse-mode jax.vjp of the cell in the parameters)
    ρ0 = sqrt((‖θ̃‖ + ε) / (‖s'‖ + ε)),   ρ1 = sqrt((‖ν̄‖ + ε) / (‖ν‖ + ε))
    s̃ ← ρ0 s' + ρ1 ν,                    θ̃ ← θ̃ / ρ0 + ν̄ / ρ1.

Then ``E[s̃ θ̃ᵀ] = s' θ̃ᵀ + E[ν νᵀ] I_t = D_t J_{t-1} + I_t``: the cross terms vanish because they are
odd in ``ν`` (``ρ1`` is even in ``ν``), so the estimate is unbiased. The scale factors ``ρ0, ρ1``
minimise the variance of the cross terms (ε keeps them finite; the factors start at zero). The
gradient of a step loss with carry cotangent ``c_t`` is ``(c_t · s̃) θ̃``.

Cost per step: one JVP and one VJP of the cell, ``O(P)`` time and memory. The signs come 32 to a
random word (:func:`~rtrl_jax._src.signs.random_signs`) and ``‖ν‖ = sqrt(S)``. ``θ̃`` is kept with the
structure of the parameters (one array per leaf): flattening it into one vector would cost XLA:CPU a
concatenation pass over ``P`` numbers per step, several times the cost of the cell itself.

Reference: C. Tallec and Y. Ollivier, "Unbiased Online Recurrent Optimization", ICLR 2018,
arXiv:1702.05043.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import CoreFn, Estimator
from rtrl_jax._src.registry import register
from rtrl_jax._src.signs import random_signs


class UOROState(NamedTuple):
    """Trace of UORO: ``J ≈ outer(carry_factor, params_factor)``.

    Attributes:
      carry_factor: ``(S,)`` the factor ``s̃`` on the flat carry.
      params_factor: the factor ``θ̃``, a pytree with the structure of the parameters.
    """

    carry_factor: jax.Array
    params_factor: Any


def _norm(tree):
    """The Euclidean norm of a pytree of arrays, as one vector: the norm of the leaves' norms.
    (XLA:CPU reduces each leaf in one pass; with ``vdot`` a kernel's cotangent went through a
    transposed copy and a windowed reduction first.)"""
    return jnp.linalg.norm(jnp.stack([jnp.linalg.norm(leaf) for leaf in jax.tree.leaves(tree)]))


def uoro(core: CoreFn, *, epsilon: float = 1e-7) -> Estimator:
    """UORO for ``core``: a rank-one, unbiased, ``O(P)`` estimate of the influence matrix.

    Args:
      core: a recurrent core ``(params, carry, x) -> (carry, out)`` for one stream (any
        :class:`~rtrl_jax.Core` or plain function).
      epsilon: the ε that keeps the scale factors ``ρ0, ρ1`` finite.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`UOROState`; ``step`` needs ``key=``.

    Example:
      >>> est = uoro(core)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x, key=key)
      >>> grads = est.grad(trace, params, carry_bar)   # unbiased estimate of carry_bar · J_t
    """

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(*jax.tree.leaves(params), flat_carry)
        return UOROState(
            jnp.zeros(flat_carry.shape, dtype), jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)
        )

    def step(trace, params, carry, x, *, key=None):
        if key is None:
            raise ValueError("UORO.step needs a random key: step(..., key=key).")
        flat_carry, unravel_carry = ravel_pytree(carry)

        def in_carry(h):
            new_carry, out = core(params, unravel_carry(h), x)
            return ravel_pytree(new_carry)[0], out

        dtype = trace.carry_factor.dtype
        (new_flat_carry, out), (tangent, _) = jax.jvp(
            in_carry, (flat_carry,), (trace.carry_factor.astype(flat_carry.dtype),)
        )
        _, immediate_vjp = jax.vjp(lambda p: ravel_pytree(core(p, carry, x)[0])[0], params)
        nu = random_signs(key, new_flat_carry.shape, new_flat_carry.dtype)
        (nu_bar,) = immediate_vjp(nu)
        tangent, nu = tangent.astype(dtype), nu.astype(dtype)
        nu_bar = jax.tree.map(lambda a: a.astype(dtype), nu_bar)
        rho0 = jnp.sqrt((_norm(trace.params_factor) + epsilon) / (jnp.linalg.norm(tangent) + epsilon))
        nu_norm = jnp.sqrt(jnp.asarray(nu.size, dtype))  # every entry is ±1
        rho1 = jnp.sqrt((_norm(nu_bar) + epsilon) / (nu_norm + epsilon))
        # Scaled by reciprocals: one division per step, not one per parameter.
        inv_rho0, inv_rho1 = 1 / rho0, 1 / rho1
        new_trace = UOROState(
            carry_factor=rho0 * tangent + rho1 * nu,
            params_factor=jax.tree.map(lambda f, b: f * inv_rho0 + b * inv_rho1, trace.params_factor, nu_bar),
        )
        return unravel_carry(new_flat_carry), out, new_trace

    def grad(trace, params, carry_bar):
        flat_carry_bar, _ = ravel_pytree(carry_bar)
        scale = jnp.dot(trace.carry_factor, flat_carry_bar.astype(trace.carry_factor.dtype))
        return jax.tree.map(lambda f, p: (scale * f).astype(jnp.result_type(p)), trace.params_factor, params)

    return Estimator(init, step, grad)


register("uoro", uoro, summary="UORO: unbiased rank-one trace, one jvp + one vjp per step", needs_key=True)
