"""Exact real-time recurrent learning (Williams & Zipser 1989) as forward-mode autodiff.

The trace is the influence matrix ``J_t = dh_t/dθ`` held as ``P`` stacked tangents of the flat carry
(an array of shape ``(P, S)``: row ``j`` is ``dh_t/dθ_j``). One step is

    J_t = I_t + D_t J_{t-1},

computed as

- the dynamics ``D_t = ∂F/∂h`` (``S × S``) materialised by ``jax.vmap`` of the cell's linearisation
  in the carry over the ``S`` basis tangents (``S`` cheap JVPs);
- the propagation as ONE matrix product ``J_{t-1} D_tᵀ`` (``(P × S)·(S × S)``, ``2 P S²`` flops), so
  the step runs at the machine's matmul rate whatever the cell (a GRU's linearisation has several
  matmuls and gates; pushing all ``P`` tangents through it would cost several times more);
- the immediate Jacobian ``I_t = ∂F/∂θ`` by reverse mode over the ``S`` carry cotangents
  (``jax.vjp`` vmapped over the carry basis), built per parameter leaf directly in the ``(P, S)``
  layout so that XLA fuses it into the addition (no transposed copy of the trace).

No ``P × P`` array is ever formed. Rows of ``J`` (one per parameter) evolve independently given
``D_t``, which is what :mod:`rtrl_jax._src.sharding` uses to shard the trace along ``P``.

With ``row_blocks=k > 1`` the update is applied to ``k`` row blocks of the trace in place, so the
peak memory of a step (with the trace donated) is about ``(1 + 1/k)`` traces instead of two, at some
cost in speed. Leave ``row_blocks=1`` when the trace is sharded along ``P``.

The gradient of a step loss with carry cotangent ``c_t`` is ``J_t c_t``; the sum over ``t`` equals
BPTT of ``Σ_t L_t``.

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

from rtrl_jax._src.base import CoreFn, Estimator


class RTRLState(NamedTuple):
    """Trace of exact RTRL.

    Attributes:
      influence: ``(P, S)`` array, ``influence[j] = d carry / d θ_j`` for the flat carry and params.
    """

    influence: jax.Array


def dynamics_and_immediate(core: CoreFn, params, carry, x):
    """One step of ``core`` with its Jacobians, as dense matrices for the flat carry and params.

    Args:
      core: ``(params, carry, x) -> (carry, out)``.
      params: parameters (a pytree).
      carry: the carry ``h_{t-1}`` (a pytree).
      x: the input ``x_t``.

    Returns:
      ``(new_carry, out, dynamics, immediate_t)`` with ``dynamics = ∂h_t/∂h_{t-1}`` of shape
      ``(S, S)`` and ``immediate_t = (∂h_t/∂θ)ᵀ`` of shape ``(P, S)`` (row ``j`` is ``∂h_t/∂θ_j``),
      in the order of ``ravel_pytree(params)``.
    """
    flat_carry, unravel_carry = ravel_pytree(carry)
    size = flat_carry.size

    def in_carry(h):
        new_carry, out = core(params, unravel_carry(h), x)
        return ravel_pytree(new_carry)[0], out

    (new_flat_carry, out), dynamics_jvp = jax.linearize(in_carry, flat_carry)
    basis = jnp.eye(size, dtype=new_flat_carry.dtype)
    dynamics, _ = jax.vmap(dynamics_jvp, out_axes=1)(basis.astype(flat_carry.dtype))

    _, immediate_vjp = jax.vjp(lambda p: ravel_pytree(core(p, carry, x)[0])[0], params)
    # out_axes=-1 puts the carry index last in every leaf, so the stacked (P, S) matrix is a
    # concatenation of contiguous row blocks that XLA fuses into its consumer.
    (leaves,) = jax.vmap(immediate_vjp, out_axes=-1)(basis)
    blocks = [jnp.reshape(leaf, (-1, size)) for leaf in jax.tree.leaves(leaves)]
    immediate_t = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=0)
    return unravel_carry(new_flat_carry), out, dynamics, immediate_t


def rtrl(core: CoreFn, row_blocks: int = 1) -> Estimator:
    """Exact RTRL for ``core``.

    Args:
      core: a recurrent core ``(params, carry, x) -> (carry, out)`` for one stream.
      row_blocks: update the ``(P, S)`` trace in this many row blocks, in place; ``1`` (default) is
        fastest, larger values lower the peak memory of a step towards one trace.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`RTRLState`.

    Example:
      >>> est = rtrl(core)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x)
      >>> grads = est.grad(trace, params, carry_bar)   # exact d(carry_bar · h_t)/dθ
    """
    if not isinstance(row_blocks, int) or row_blocks < 1:
        raise ValueError(f"row_blocks must be a positive integer, got {row_blocks!r}.")

    def init(params, carry, *, key=None):
        del key
        flat_params, _ = ravel_pytree(params)
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(flat_params, flat_carry)
        return RTRLState(jnp.zeros((flat_params.size, flat_carry.size), dtype))

    def step(trace, params, carry, x, *, key=None):
        del key
        new_carry, out, dynamics, immediate_t = dynamics_and_immediate(core, params, carry, x)
        influence = trace.influence
        dynamics_t = dynamics.T.astype(influence.dtype)
        immediate_t = immediate_t.astype(influence.dtype)
        rows = influence.shape[0]
        blocks = min(row_blocks, max(rows, 1))
        if blocks == 1:
            return new_carry, out, RTRLState(influence @ dynamics_t + immediate_t)
        bounds = [rows * i // blocks for i in range(blocks + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            block = influence[lo:hi] @ dynamics_t + immediate_t[lo:hi]
            influence = influence.at[lo:hi].set(block)
        return new_carry, out, RTRLState(influence)

    def grad(trace, params, carry_bar):
        _, unravel_params = ravel_pytree(params)
        flat_carry_bar, _ = ravel_pytree(carry_bar)
        return unravel_params(trace.influence @ flat_carry_bar.astype(trace.influence.dtype))

    return Estimator(init, step, grad)
