"""Exact real-time recurrent learning (Williams & Zipser 1989) as forward-mode autodiff.

The trace is the influence matrix ``J_t = dh_t/dθ`` held as stacked tangents of the flat carry, one
block per parameter leaf: a pytree with the structure of the parameters whose entry for a parameter
array ``θ_l`` is a ``(θ_l.size, S)`` block (row ``j`` is ``dh_t/d(θ_l)_j``), held in row chunks
(:class:`RowChunks`) when the trace is large (below). One step is

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
the trace donated) is two traces. With ``k > 1`` a block of more than ``P / k`` rows is held as a
:class:`RowChunks`, separate buffers of at most ``P / k`` rows each, and the blocks and parts are
updated one after another, each product waiting on the previous update (``base.after``, a data
dependence on every backend: XLA:CPU would otherwise run every product before the additions), so a
step holds one part's product at a time and writes each part in place. Separate buffers rather than
row slices of one block: XLA:CPU would copy a row slice before its product, an extra pass over the
trace, where a whole part is multiplied as it is. By default (``row_blocks=None``,
:func:`default_row_blocks`) a trace under :data:`CHUNKED_TRACE_BYTES` (16 MiB) is updated with
``k = 1`` and a larger one with ``k =`` :data:`DEFAULT_ROW_BLOCKS`. XLA's ``memory_analysis()`` of
a donated step then gives a peak of 1.12–1.14× the trace for a tanh RNN (n = 256), a GRU and an
LSTM (n = 128 and 256), against 2.0× with ``k = 1``, and on an idle 2-core CPU the step takes
0.88–1.01× the time of ``k = 1`` (``benchmarks/rtrl_row_blocks.py``,
``benchmarks/results/rtrl_row_blocks.md``). Pass ``row_blocks=1`` when the trace is sharded along
its rows.

The gradient of a step loss with carry cotangent ``c_t`` is ``J_t c_t``; the sum over ``t`` equals
BPTT of ``Σ_t L_t``. :func:`rtrl_jax.influence_matrix` assembles the dense ``S × P`` matrix.

Cost per step for a dense RNN with ``n`` units and ``P ≈ n²`` parameters: ``O(n² P) = O(n⁴)`` time
and ``O(n P) = O(n³)`` memory.

Reference: R. J. Williams and D. Zipser, "A learning algorithm for continually running fully
recurrent neural networks", Neural Computation 1(2), 1989.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import CoreFn, Estimator, after
from rtrl_jax._src.registry import always_exact, register


class RTRLState(NamedTuple):
    """Trace of exact RTRL.

    Attributes:
      influence: a pytree with the structure of the parameters (as a prefix); the entry for a
        parameter array ``θ_l`` is its ``(θ_l.size, S)`` block, row ``j`` being
        ``d carry / d (θ_l)_j`` for the flat carry, or, for a block of more rows than
        ``row_blocks`` allows, a :class:`RowChunks` of consecutive parts of those rows.
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


class RowChunks(NamedTuple):
    """One influence block stored as consecutive chunks of its rows.

    Row ``j`` of the ``(P_l, S)`` block is row ``j - lo_c`` of the part ``c`` whose rows start at
    ``lo_c``. Updating separate buffers chunk by chunk keeps a step's peak near one trace without
    slicing the block: XLA:CPU copies a row slice before its product (an extra pass over the trace),
    while a whole part is multiplied and its update written in place.

    Attributes:
      parts: the chunks, each ``(rows_c, S)``, in row order.
    """

    parts: tuple[jax.Array, ...]

    def dense(self) -> jax.Array:
        """The ``(P_l, S)`` block (a concatenation: for inspection, not for the step)."""
        return jnp.concatenate(self.parts, axis=-2)


def _row_bounds(rows: int, max_rows: int) -> list[int]:
    """Bounds of ``ceil(rows / max_rows)`` near-equal chunks of ``rows`` rows."""
    chunks = -(-rows // max_rows)
    return [rows * i // chunks for i in range(chunks + 1)]


def _propagate(blocks, immediates, dynamics_t, ordered):
    """``block Dᵀ + immediate`` for every block, and for every part of a :class:`RowChunks` block.

    With ``ordered=False`` every product is formed independently (XLA may run them concurrently and
    holds all of them at once: a step's peak is two traces). With ``ordered=True`` each product
    waits on the previous update (``after``), so a step holds one product at a time; each part of a
    chunked block is its own buffer, updated in place when the trace is donated.
    """

    def update(part, imm, previous):
        dynamics = after(dynamics_t, previous, every_backend=True) if ordered else dynamics_t
        return part @ dynamics + imm

    updated, previous = [], None
    for block, imm in zip(blocks, immediates, strict=True):
        if isinstance(block, RowChunks):
            parts, lo = [], 0
            for part in block.parts:
                hi = lo + part.shape[0]
                previous = update(part, imm[lo:hi], previous)
                parts.append(previous)
                lo = hi
            block = RowChunks(tuple(parts))
        else:
            block = previous = update(block, imm, previous)
        updated.append(block)
    return updated


DEFAULT_ROW_BLOCKS = 8
"""The ``row_blocks`` of a trace of :data:`CHUNKED_TRACE_BYTES` or more by default (peak ≤ 1.5× the
trace)."""

CHUNKED_TRACE_BYTES = 2**24
"""The trace size (16 MiB) from which the default bounds a step's peak memory. Below it a second
trace costs little memory, and one product at a time costs speed: on a 2-core CPU the ordered step
of a GRU (``row_blocks=8``) took 1.27–1.55× the unordered one with 0.5 and 3.4 MiB traces
(n = 32, 64) and 1.00× with 26 MiB (n = 128).
The size is one stream's: the step is written for one stream, so under ``jax.vmap`` over ``B``
streams it cannot see ``B``. With many streams of small traces, pass ``row_blocks=8`` to bound the
peak of the batch."""


def default_row_blocks(blocks) -> int:
    """The default ``row_blocks`` for dense influence blocks ``blocks`` (shapes and dtypes).

    ``1`` (whole, independent updates) for a trace under :data:`CHUNKED_TRACE_BYTES`, else
    :data:`DEFAULT_ROW_BLOCKS`.
    """
    nbytes = sum(b.size * jnp.dtype(b.dtype).itemsize for b in blocks)
    return 1 if nbytes < CHUNKED_TRACE_BYTES else DEFAULT_ROW_BLOCKS


def rtrl(core: CoreFn, row_blocks: int | None = None) -> Estimator:
    """Exact RTRL for ``core``.

    Args:
      core: a recurrent core ``(params, carry, x) -> (carry, out)`` for one stream.
      row_blocks: ``k``: with ``k = 1`` every block's product is formed independently (a step's
        peak is two traces); with ``k > 1`` every block of more than ``P / k`` rows is held as a
        :class:`RowChunks` of at most ``P / k`` rows a part, and blocks and parts are updated one
        after another in place, which lowers the peak towards one trace; ``None`` (default):
        :func:`default_row_blocks`.

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

    def max_rows(params, size, dtype):
        """The most rows a part holds (``None``: independent whole-block updates)."""
        shapes = [jax.ShapeDtypeStruct((jnp.size(p), size), dtype) for p in jax.tree.leaves(params)]
        chunks = default_row_blocks(shapes) if row_blocks is None else row_blocks
        return None if chunks == 1 else -(-sum(s.shape[0] for s in shapes) // chunks)

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        size = flat_carry.size
        dtype = jnp.result_type(*jax.tree.leaves(params), flat_carry)
        limit = max_rows(params, size, dtype)

        def zeros(p):
            rows = jnp.size(p)
            if limit is None or rows <= limit:
                return jnp.zeros((rows, size), dtype)
            bounds = _row_bounds(rows, limit)
            return RowChunks(tuple(jnp.zeros((hi - lo, size), dtype) for lo, hi in pairwise(bounds)))

        return RTRLState(jax.tree.map(zeros, params))

    def step(trace, params, carry, x, *, key=None):
        del key
        new_carry, out, dynamics, immediate_t = dynamics_and_immediate(core, params, carry, x)
        treedef = jax.tree.structure(params)
        blocks = treedef.flatten_up_to(trace.influence)
        leaves = jax.tree.leaves(trace.influence)
        dtype = leaves[0].dtype if leaves else dynamics.dtype
        immediates = [imm.astype(dtype) for imm in treedef.flatten_up_to(immediate_t)]
        influence = _propagate(
            blocks,
            immediates,
            dynamics.T.astype(dtype),
            max_rows(params, dynamics.shape[0], dtype) is not None,
        )
        return new_carry, out, RTRLState(jax.tree.unflatten(treedef, influence))

    def grad(trace, params, carry_bar):
        flat_carry_bar, _ = ravel_pytree(carry_bar)

        def block_grad(p, block):
            parts = block.parts if isinstance(block, RowChunks) else (block,)
            rows = jnp.concatenate([part @ flat_carry_bar.astype(part.dtype) for part in parts])
            return jnp.reshape(rows, jnp.shape(p)).astype(jnp.result_type(p))

        return jax.tree.map(block_grad, params, trace.influence)

    return Estimator(init, step, grad)


register(
    "rtrl", rtrl, summary="exact RTRL: dense influence matrix, forward-mode autodiff", exact_for=always_exact
)
