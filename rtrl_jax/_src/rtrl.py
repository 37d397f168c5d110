"""Exact real-time recurrent learning (Williams & Zipser 1989) as forward-mode autodiff.

The trace is the influence matrix ``J_t = dh_t/dθ`` held as stacked tangents of the flat carry, one
block per parameter leaf: a pytree with the structure of the parameters whose leaf for a parameter
array ``θ_l`` has shape ``(θ_l.size, S)`` (row ``j`` is ``dh_t/d(θ_l)_j``). One step is

    J_t = I_t + D_t J_{t-1},

computed as

- the dynamics ``D_t = ∂F/∂h`` (``S × S``) materialised by ``jax.vmap`` of the cell's linearisation
  in the carry over the ``S`` basis tangents (``S`` cheap JVPs);
- the propagation as one matrix product per parameter leaf, ``J_{t-1} D_tᵀ``
  (``(P_l × S)·(S × S)``; ``2 P S²`` flops in all), so the step runs at the machine's matmul rate
  whatever the cell (a GRU's linearisation has several matmuls and gates; pushing all ``P`` tangents
  through it would cost several times more);
- the immediate Jacobian ``I_t = ∂F/∂θ`` by reverse mode over the ``S`` carry cotangents
  (``jax.vjp`` vmapped over the carry basis), one ``(P_l, S)`` block per leaf that XLA fuses into the
  addition.

Keeping one block per leaf (rather than one ``(P, S)`` matrix) matters for speed: the concatenation
of the leaves' immediate Jacobians into one matrix is an extra pass over ``P × S`` numbers that
XLA:CPU does not fuse into the addition (it cost a GRU with ``n = 128`` a third of its step).

No ``P × P`` array is ever formed. Rows of ``J`` (one per parameter) evolve independently given
``D_t``, which is what :mod:`rtrl_jax._src.sharding` uses to shard each block along its rows.

With ``k = row_blocks = 1`` every block's product ``J_{t-1} D_tᵀ`` is formed independently: XLA may
run them concurrently and holds all of them before the additions, so the peak memory of a step (with
the trace donated) is two traces. With ``k > 1`` the blocks are updated one after another, each
product waiting on the previous update (``base.after``, a data dependence on every backend: XLA:CPU
would otherwise run every product before the additions), so a step holds one product at a time; a
block of more than ``P / k`` rows is updated in place in chunks of at most ``P / k`` rows. By
default (``row_blocks=None``, :func:`default_row_blocks`) a trace under :data:`CHUNKED_TRACE_BYTES`
(16 MiB) is updated with ``k = 1``; a larger one of several comparable blocks (a GRU's or an LSTM's
kernels) one whole block after another, with no chunks; a larger one dominated by one block (a tanh
RNN's recurrent kernel) in :data:`DEFAULT_ROW_BLOCKS` chunks. XLA's ``memory_analysis()`` of a
donated step then gives a peak of 1.33× the trace for a GRU, 1.25–1.26× for an LSTM and 1.25× for a
tanh RNN (n = 128 and 256) against 2.0× with ``k = 1``. On an idle 2-core CPU the ordered GRU and
LSTM steps took 0.97–1.04× the time of ``k = 1``; the tanh RNN's chunks took 1.14–1.23× at n = 256,
because XLA:CPU copies each row slice before its product, an extra pass over the trace
(``benchmarks/rtrl_row_blocks.py``, ``benchmarks/results/rtrl_row_blocks.md``). Pass
``row_blocks=1`` when speed matters more than memory, and when the trace is sharded along its rows.

The gradient of a step loss with carry cotangent ``c_t`` is ``J_t c_t``; the sum over ``t`` equals
BPTT of ``Σ_t L_t``. :func:`rtrl_jax.influence_matrix` assembles the dense ``S × P`` matrix.

Cost per step for a dense RNN with ``n`` units and ``P ≈ n²`` parameters: ``O(n² P) = O(n⁴)`` time
and ``O(n P) = O(n³)`` memory.

Reference: R. J. Williams and D. Zipser, "A learning algorithm for continually running fully
recurrent neural networks", Neural Computation 1(2), 1989.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import CoreFn, Estimator, after
from rtrl_jax._src.registry import always_exact, register


class RTRLState(NamedTuple):
    """Trace of exact RTRL.

    Attributes:
      influence: a pytree with the structure of the parameters; the leaf for a parameter array
        ``θ_l`` is ``(θ_l.size, S)``, row ``j`` being ``d carry / d (θ_l)_j`` for the flat carry.
    """

    influence: Any

    def param_axes(self) -> RTRLState:
        """Axis 0 of every influence block runs over its parameters (its rows)."""
        return RTRLState(jax.tree.map(lambda _: 0, self.influence))


def dynamics_and_immediate(core: CoreFn, params, carry, x):
    """One step of ``core`` with its Jacobians, as dense matrices for the flat carry.

    Args:
      core: ``(params, carry, x) -> (carry, out)``.
      params: parameters (a pytree).
      carry: the carry ``h_{t-1}`` (a pytree).
      x: the input ``x_t``.

    Returns:
      ``(new_carry, out, dynamics, immediate_t)`` with ``dynamics = ∂h_t/∂h_{t-1}`` of shape
      ``(S, S)`` and ``immediate_t = (∂h_t/∂θ)ᵀ`` as a pytree with the structure of ``params``,
      the leaf for ``θ_l`` of shape ``(θ_l.size, S)`` (row ``j`` is ``∂h_t/∂(θ_l)_j``).
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
    # out_axes=-1 puts the carry index last in every leaf: each leaf reshapes to its (P_l, S) block.
    (leaves,) = jax.vmap(immediate_vjp, out_axes=-1)(basis)
    immediate_t = jax.tree.map(lambda leaf: jnp.reshape(leaf, (-1, size)), leaves)
    return unravel_carry(new_flat_carry), out, dynamics, immediate_t


def _propagate(blocks, immediates, dynamics_t, max_rows):
    """``block Dᵀ + immediate`` for every block, one update after another.

    With ``max_rows=None`` every block is updated whole and independently (XLA may run the
    products concurrently, and holds all of them at once: a step's peak is two traces). Otherwise
    a whole block's product waits on the previous update (``after``), so a step holds one product
    at a time, and a block of more than ``max_rows`` rows is updated in place in chunks of at most
    ``max_rows`` rows, each chunk's product reading the block its predecessor's update wrote.
    """
    if max_rows is None:
        return [block @ dynamics_t + imm for block, imm in zip(blocks, immediates, strict=True)]
    updated, previous = [], None
    for block, imm in zip(blocks, immediates, strict=True):
        rows = block.shape[0]
        chunks = max(1, -(-rows // max_rows))
        if chunks == 1:
            block = previous = block @ after(dynamics_t, previous, every_backend=True) + imm
        else:
            bounds = [rows * i // chunks for i in range(chunks + 1)]
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                previous = block[lo:hi] @ dynamics_t + imm[lo:hi]
                block = block.at[lo:hi].set(previous)
        updated.append(block)
    return updated


DEFAULT_ROW_BLOCKS = 8
"""The chunks a large trace dominated by one block is updated in by default (peak ≤ 1.5× the trace)."""

WHOLE_BLOCK_SHARE = 3
"""A large trace whose blocks each hold at most ``1 / WHOLE_BLOCK_SHARE`` of its rows is updated by
default one whole block after another (``row_blocks = WHOLE_BLOCK_SHARE``), with no chunks."""

CHUNKED_TRACE_BYTES = 2**24
"""The trace size (16 MiB) from which the default bounds a step's peak memory. Below it a second
trace costs little memory, and one product at a time costs speed: on a 2-core CPU the ordered step
of a GRU took 1.15–1.43× the unordered one with a 3.4 MiB trace (n = 64) and 1.00× with 26 MiB.
The size is one stream's: the step is written for one stream, so under ``jax.vmap`` over ``B``
streams it cannot see ``B``. With many streams of small traces, pass ``row_blocks=3`` (or more)
to bound the peak of the batch."""


def default_row_blocks(blocks) -> int:
    """The default ``row_blocks`` for influence blocks ``blocks``.

    ``1`` (whole, independent updates) for a trace under :data:`CHUNKED_TRACE_BYTES`;
    :data:`WHOLE_BLOCK_SHARE` (whole blocks one after another) for a larger trace of several
    comparable blocks (a GRU's or an LSTM's kernels); :data:`DEFAULT_ROW_BLOCKS` chunks for a larger
    trace with a block of more than ``1 / WHOLE_BLOCK_SHARE`` of its rows (a tanh RNN's recurrent
    kernel).
    """
    nbytes = sum(b.size * jnp.dtype(b.dtype).itemsize for b in blocks)
    if nbytes < CHUNKED_TRACE_BYTES:
        return 1
    rows = sum(b.shape[0] for b in blocks)
    if WHOLE_BLOCK_SHARE * max(b.shape[0] for b in blocks) <= rows:
        return WHOLE_BLOCK_SHARE
    return DEFAULT_ROW_BLOCKS


def rtrl(core: CoreFn, row_blocks: int | None = None) -> Estimator:
    """Exact RTRL for ``core``.

    Args:
      core: a recurrent core ``(params, carry, x) -> (carry, out)`` for one stream.
      row_blocks: ``k``: with ``k = 1`` every block's product is formed independently (fastest,
        a step's peak is two traces); with ``k > 1`` the blocks are updated one after another and
        every block of more than ``P / k`` rows in place in chunks of at most ``P / k`` rows, which
        lowers the peak towards one trace; ``None`` (default): :func:`default_row_blocks`.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`RTRLState`.

    Example:
      >>> est = rtrl(core)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x)
      >>> grads = est.grad(trace, params, carry_bar)   # exact d(carry_bar · h_t)/dθ
    """
    if row_blocks is not None and (
        isinstance(row_blocks, bool) or not isinstance(row_blocks, int) or row_blocks < 1
    ):
        raise ValueError(f"row_blocks must be a positive integer or None, got {row_blocks!r}.")

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(*jax.tree.leaves(params), flat_carry)
        return RTRLState(jax.tree.map(lambda p: jnp.zeros((jnp.size(p), flat_carry.size), dtype), params))

    def step(trace, params, carry, x, *, key=None):
        del key
        new_carry, out, dynamics, immediate_t = dynamics_and_immediate(core, params, carry, x)
        blocks = jax.tree.leaves(trace.influence)
        dtype = blocks[0].dtype if blocks else dynamics.dtype
        dynamics_t = dynamics.T.astype(dtype)
        chunks = default_row_blocks(blocks) if row_blocks is None else row_blocks
        max_rows = None if chunks == 1 else -(-sum(b.shape[0] for b in blocks) // chunks)
        treedef = jax.tree.structure(trace.influence)
        immediates = [imm.astype(dtype) for imm in treedef.flatten_up_to(immediate_t)]
        influence = _propagate(blocks, immediates, dynamics_t, max_rows)
        return new_carry, out, RTRLState(jax.tree.unflatten(treedef, influence))

    def grad(trace, params, carry_bar):
        flat_carry_bar, _ = ravel_pytree(carry_bar)
        return jax.tree.map(
            lambda block, p: jnp.reshape(block @ flat_carry_bar.astype(block.dtype), jnp.shape(p)).astype(
                jnp.result_type(p)
            ),
            trace.influence,
            params,
        )

    return Estimator(init, step, grad)


register(
    "rtrl", rtrl, summary="exact RTRL: dense influence matrix, forward-mode autodiff", exact_for=always_exact
)
