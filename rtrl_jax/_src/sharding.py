"""Scaling past one device with JAX's own SPMD machinery (``Mesh`` + ``NamedSharding``).

Exact RTRL's trace is the influence matrix, one ``(P_l, S)`` block of rows per parameter leaf, one
row per parameter. Given the dynamics
``D_t`` (``S × S``, cheap, computed redundantly on every device) the rows evolve independently,
``J_t[j] = J_{t-1}[j] D_tᵀ + I_t[j]``, so sharding the trace along ``P`` needs no communication for
the propagation: each device holds ``P / k`` rows, multiplies them by ``D_tᵀ`` and adds its rows of
the immediate Jacobian. (XLA's partitioner may compute the immediate Jacobian split along the carry
and move it with an all-to-all of ``P S / k`` values per device per step; the ``P × S`` trace itself
is never gathered.) Only the gradient ``J_t c_t`` stays sharded along ``P`` (it is a parameter
vector) until an optimizer or a ``jax.device_get`` gathers it.

Independent streams (a batch, from ``jax.vmap``) are sharded along a second, data axis. A mesh has
the two axes ``("data", "params")``; with a ``1 × 1`` mesh, or no mesh at all, the same code runs on
one device unchanged. Nothing here is specific to a platform: on a multi-GPU or TPU host the mesh
spans its local devices, and after ``jax.distributed.initialize()`` on every host it spans all
devices of all hosts (see ``docs/scaling.md``).

Typical use::

    mesh = make_mesh(param_shards=4)                 # or make_mesh(data_shards=2, param_shards=2)
    estimator = rtrl(core, row_blocks=1)         # whole-block updates keep the rows on their devices
    step = sharded_step(estimator, mesh, batched=True)
    traces = shard_trace(jax.vmap(lambda c: estimator.init(params, c))(carries), mesh, batched=True)
    carries, xs = shard_batch(carries, mesh), shard_batch(xs, mesh)
    carries, outs, traces = step(traces, params, carries, xs_t)

Traces of other estimators are sharded along the batch axis only (their leaves are replicated
across the parameter axis), so :func:`sharded_step` serves every registered estimator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rtrl_jax._src.base import Estimator, Trace, trace_param_axes

DATA_AXIS = "data"
PARAM_AXIS = "params"


def make_mesh(
    param_shards: int | None = None,
    data_shards: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``(data, params)`` device mesh.

    Args:
      param_shards: devices along the parameter axis (the rows of RTRL's influence matrix);
        defaults to all devices not used by ``data_shards``.
      data_shards: devices along the batch (stream) axis.
      devices: the devices to use (default ``jax.devices()``: every device of every process).

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(data_shards, param_shards)`` with axis names
      ``("data", "params")``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data_shards < 1 or len(devices) % data_shards:
        raise ValueError(f"data_shards={data_shards} does not divide {len(devices)} devices.")
    if param_shards is None:
        param_shards = len(devices) // data_shards
    needed = data_shards * param_shards
    if param_shards < 1 or needed > len(devices):
        raise ValueError(
            f"a {data_shards} x {param_shards} mesh needs {needed} devices, {len(devices)} given."
        )
    grid = np.asarray(devices[:needed], dtype=object).reshape(data_shards, param_shards)
    return Mesh(grid, (DATA_AXIS, PARAM_AXIS))


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis])


def _spec(mesh: Mesh, shape: tuple[int, ...], axes: Sequence[str | None]) -> NamedSharding:
    """``axes`` for the leading dimensions of ``shape``; an axis that does not divide its
    dimension is dropped (that dimension is replicated)."""
    kept = []
    for dim, axis in zip(shape, axes, strict=False):
        kept.append(axis if axis is not None and dim % _axis_size(mesh, axis) == 0 else None)
    while kept and kept[-1] is None:
        kept.pop()
    return NamedSharding(mesh, P(*kept))


def batch_sharding(mesh: Mesh, tree: Any, *, batched: bool = True) -> Any:
    """Shardings for ``tree``: the leading (batch) axis along ``"data"`` when ``batched``, else
    replicated."""
    axes = (DATA_AXIS,) if batched else ()
    return jax.tree.map(lambda a: _spec(mesh, np.shape(a), axes), tree)


def trace_sharding(mesh: Mesh, trace: Trace, *, batched: bool = False) -> Any:
    """Shardings for an estimator's trace.

    Leaves with an axis over parameters (:func:`~rtrl_jax._src.base.trace_param_axes`: RTRL's
    influence blocks, along their rows) are sharded along it (``"params"``); every other trace
    leaf only along the batch axis. With ``batched`` the leading axis of every leaf is the stream
    axis and goes along ``"data"``. Dimensions that a mesh axis does not divide are replicated.

    Args:
      mesh: a mesh from :func:`make_mesh`.
      trace: a trace (arrays or ``jax.ShapeDtypeStruct``), batched or not.
      batched: whether the leaves have a leading stream axis.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``trace``.
    """
    param_axes = trace_param_axes(trace)
    if param_axes is None:
        return batch_sharding(mesh, trace, batched=batched)
    lead = (DATA_AXIS,) if batched else ()

    def leaf_sharding(leaf, axis):
        return _spec(mesh, np.shape(leaf), (*lead, *([None] * axis), PARAM_AXIS))

    return jax.tree.map(leaf_sharding, trace, param_axes)


def shard_trace(trace: Trace, mesh: Mesh, *, batched: bool = False) -> Trace:
    """Places ``trace`` on ``mesh`` with :func:`trace_sharding`."""
    return jax.device_put(trace, trace_sharding(mesh, trace, batched=batched))


def shard_batch(tree: Any, mesh: Mesh, *, batched: bool = True) -> Any:
    """Places ``tree`` on ``mesh``, its leading axis along ``"data"`` (replicated when not
    ``batched``: parameters, for instance)."""
    return jax.device_put(tree, batch_sharding(mesh, tree, batched=batched))


def sharded_step(estimator: Estimator, mesh: Mesh, *, batched: bool = False, donate: bool = True):
    """``estimator.step`` jitted for ``mesh``: traces stay sharded by :func:`trace_sharding`.

    Inputs should be placed with :func:`shard_trace` / :func:`shard_batch` (parameters replicated:
    ``shard_batch(params, mesh, batched=False)``). The step itself is the estimator's own code; the
    sharding of its output trace is pinned with ``jax.lax.with_sharding_constraint`` and XLA's SPMD
    partitioner (GSPMD) splits the computation, so the influence matrix's rows never meet on one
    device. It advances core and trace only: the step loss is the caller's, so are ``grad`` and
    ``observe`` of its cotangent (DNI learns its map there) on the sharded trace.

    Args:
      estimator: any estimator.
      mesh: a mesh from :func:`make_mesh`.
      batched: map the step over a leading stream axis of ``trace``, ``carry``, ``x`` (and ``key``)
        with ``jax.vmap``; parameters are shared.
      donate: donate the input trace, so the new one reuses its memory.

    Returns:
      ``step(trace, params, carry, x, key=None) -> (carry, out, trace)``.
    """

    def one(trace, params, carry, x, key):
        return estimator.step(trace, params, carry, x, key=key)

    def step(trace, params, carry, x, key=None):
        if batched:
            key_axis = None if key is None else 0
            fn = jax.vmap(one, in_axes=(0, None, 0, 0, key_axis))
        else:
            fn = one
        new_carry, out, new_trace = fn(trace, params, carry, x, key)
        new_trace = jax.lax.with_sharding_constraint(
            new_trace, trace_sharding(mesh, new_trace, batched=batched)
        )
        new_carry = jax.lax.with_sharding_constraint(
            new_carry, batch_sharding(mesh, new_carry, batched=batched)
        )
        return new_carry, out, new_trace

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def per_device_bytes(tree: Any) -> int:
    """Bytes of ``tree`` held on its first addressable device (for checking a sharding)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.addressable_shards[0]
        total += math.prod(shard.data.shape) * leaf.dtype.itemsize
    return total
