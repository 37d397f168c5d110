"""The recommended step for data that arrives one time step at a time.

When the next input exists only after the previous step ran (an environment reacting to the
model's output, a robot, a live feed), the run cannot be one ``jax.lax.scan``: Python calls a
jitted step once per time step. Such a call costs, beyond the step's arithmetic, JAX's dispatch
(checking each argument against the compiled signature, handing its buffer to the runtime,
wrapping each output buffer in a new array: about a microsecond per argument and output leaf on a
CPU, and a train state has many leaves: a GRU with Adam ~50, the parameters, both moments of
each, the carry, the trace, the key, the step counter) and the launch of the compiled program
(on XLA:CPU its kernels go through a thread pool; inside a ``lax.scan`` the same step costs
several times less, ``benchmarks/README.md``). :func:`live_step` and :func:`pack_state` keep the
dispatch low:

- one compiled call per step: the whole train step (core, trace, loss, gradient, Optax update,
  metrics) is one jitted function, compiled at the first call and reused for every later one
  (inputs of the same shapes and dtypes, NumPy arrays or device arrays alike);
- few leaves: :func:`pack_state` ravels the state's leaves into one flat buffer per dtype (leaves
  larger than ``max_leaf_bytes`` stay buffers of their own, see below), and the step reads its
  leaves as static slices of those buffers and writes the new state back into them, inside the
  compiled call. A GRU's ~50 leaves become 3 buffers (float32, int32, uint32);
- the state is donated (``donate_argnums=0``): XLA writes the new state into the old state's
  buffers, so no second state is allocated per step and memory stays at one state.

Writing the packed buffer copies every packed leaf once per step (XLA concatenates the new
leaves), so a leaf above ``max_leaf_bytes`` (default 64 KiB: an exact RTRL trace, a large kernel)
keeps its own buffer, updated in place and never copied.

``benchmarks/online_loop.py`` times the loop against a trivial jitted function with the same
argument leaves (the dispatch floor), packed and unpacked, in one run.

Example::

    train_step = rj.make_train_step(core, estimator, optimizer)
    step = rj.live_step(train_step)
    packed = rj.pack_state(state)                # a few flat buffers instead of ~50 leaves
    for x, y in feed:                            # x: (batch, input), y: (batch, classes), NumPy ok
        packed, metrics = step(packed, x, y)     # `packed` is consumed: use only the returned one
    state = rj.unpack_state(packed)              # the OnlineTrainState, e.g. to save or evaluate

The same wraps :func:`~rtrl_jax.make_model_train_step` for a whole Flax model. The step takes an
unpacked state too (then every leaf is an argument of its own).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rtrl_jax._src.tasks import Stream

TrainStep = Callable[[Any, Stream], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each leaf of a state lies in the buffers of its :class:`PackedState` (static).

    Attributes:
      treedef: the state's tree structure.
      shapes: the shape of each leaf, in ``treedef``'s order.
      dtypes: the dtype of each leaf.
      groups: for each flat buffer, the indices of the leaves raveled into it, in order.
      alone: the indices of the leaves kept as buffers of their own (after the flat ones).
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    groups: tuple[tuple[int, ...], ...]
    alone: tuple[int, ...]


@jax.tree_util.register_pytree_node_class
class PackedState:
    """A state held as a few buffers: its small leaves raveled into one flat buffer per dtype.

    A pytree whose leaves are ``buffers``; the layout (tree structure, leaf shapes, which leaf
    lies where) is static, so a jitted function of a packed state is compiled once per layout.
    Build one with :func:`pack_state`; :func:`unpack_state` gives the state back.

    Attributes:
      buffers: one flat buffer per dtype of the packed leaves, then the leaves kept alone.
    """

    def __init__(self, buffers: tuple[jax.Array, ...], layout: _Layout):
        self.buffers = buffers
        self.layout = layout

    def tree_flatten(self):
        return self.buffers, self.layout

    @classmethod
    def tree_unflatten(cls, layout, buffers):
        return cls(tuple(buffers), layout)


def _packable(leaf: jax.Array, max_leaf_bytes: int) -> bool:
    """Whether a leaf can share a flat buffer: a plain, strongly typed, single-device array that
    is not larger than ``max_leaf_bytes``."""
    return (
        not jnp.issubdtype(leaf.dtype, jax.dtypes.extended)
        and not leaf.weak_type
        and len(leaf.sharding.device_set) == 1
        and leaf.size * leaf.dtype.itemsize <= max_leaf_bytes
    )


def _layout(state: Any, max_leaf_bytes: int) -> _Layout:
    leaves, treedef = jax.tree.flatten(state)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    by_dtype: dict[Any, list[int]] = {}
    alone = []
    for index, leaf in enumerate(leaves):
        if _packable(leaf, max_leaf_bytes):
            by_dtype.setdefault(leaf.dtype, []).append(index)
        else:
            alone.append(index)
    return _Layout(
        treedef=treedef,
        shapes=tuple(leaf.shape for leaf in leaves),
        dtypes=tuple(leaf.dtype for leaf in leaves),
        groups=tuple(tuple(group) for group in by_dtype.values()),
        alone=tuple(alone),
    )


def _pack(state: Any, layout: _Layout) -> PackedState:
    """``state`` (of ``layout``'s structure and shapes) as the buffers of ``layout``."""
    leaves, treedef = jax.tree.flatten(state)
    shapes = tuple(jnp.shape(leaf) for leaf in leaves)
    dtypes = tuple(jnp.result_type(leaf) for leaf in leaves)
    if (treedef, shapes, dtypes) != (layout.treedef, layout.shapes, layout.dtypes):
        raise ValueError(
            "the state's structure, leaf shapes or dtypes differ from the packed layout's: the train "
            "step must return a state of the structure, shapes and dtypes it was given."
        )
    flat = [jnp.concatenate([jnp.ravel(leaves[index]) for index in group]) for group in layout.groups]
    return PackedState((*flat, *(leaves[index] for index in layout.alone)), layout)


def _unpack(packed: PackedState) -> Any:
    layout = packed.layout
    leaves: list[Any] = [None] * len(layout.shapes)
    for buffer, group in zip(packed.buffers, layout.groups, strict=False):
        start = 0
        for index in group:
            size = math.prod(layout.shapes[index])
            leaves[index] = buffer[start : start + size].reshape(layout.shapes[index])
            start += size
    for buffer, index in zip(packed.buffers[len(layout.groups) :], layout.alone, strict=True):
        leaves[index] = buffer
    return layout.treedef.unflatten(leaves)


_pack_jit = jax.jit(_pack, static_argnums=1)
_unpack_jit = jax.jit(_unpack)


def pack_state(state: Any, *, max_leaf_bytes: int = 1 << 16) -> PackedState:
    """``state`` as a :class:`PackedState`: its leaves raveled into one flat buffer per dtype.

    A leaf stays a buffer of its own when it is larger than ``max_leaf_bytes``, weakly typed, of
    an extended dtype (a typed PRNG key) or spread over several devices. The state is copied; it
    stays usable.

    Args:
      state: any pytree of arrays, e.g. an :class:`~rtrl_jax.OnlineTrainState`.
      max_leaf_bytes: the largest leaf that shares a flat buffer.

    Returns:
      The packed state, for the step of :func:`live_step`.
    """
    return _pack_jit(state, _layout(state, max_leaf_bytes))


def unpack_state(packed: PackedState) -> Any:
    """The state held by ``packed`` (new arrays; ``packed`` stays usable)."""
    return _unpack_jit(packed)


def live_step(train_step: TrainStep) -> Callable[..., tuple[Any, Any]]:
    """``train_step`` jitted for one call per time step, with the state donated.

    Args:
      train_step: ``(state, batch) -> (state, metrics)`` for a :class:`~rtrl_jax.Stream` slice of
        one time step (leading axis batch), e.g. from :func:`~rtrl_jax.make_train_step` or
        :func:`~rtrl_jax.make_model_train_step`.

    Returns:
      ``step(state, inputs, targets, mask=None, reset=None) -> (state, metrics)``, jitted, with
      ``state`` donated (its buffers are reused for the returned state: do not read the old one
      afterwards; a plain state shares its parameter arrays with the ``params`` given to
      :func:`~rtrl_jax.init_train_state`, so those are consumed too, while :func:`pack_state`
      copies). ``state`` is a :class:`PackedState` from :func:`pack_state` (recommended: a few
      arguments instead of one per leaf) or the state itself; the returned state is of the same
      kind. ``inputs`` and ``targets`` have leading axis batch; ``mask`` (default all ones)
      weights each stream's loss; ``reset`` (default all ``False``) marks streams whose episode
      starts at this step.
    """

    def step(state, inputs, targets, mask=None, reset=None):
        batch_size = jax.tree.leaves(inputs)[0].shape[0]
        if mask is None:
            mask = jnp.ones((batch_size,), jnp.result_type(*jax.tree.leaves(targets), jnp.float32))
        if reset is None:
            reset = jnp.zeros((batch_size,), bool)
        batch = Stream(inputs=inputs, targets=targets, mask=mask, reset=reset)
        if not isinstance(state, PackedState):
            return train_step(state, batch)
        new_state, metrics = train_step(_unpack(state), batch)
        return _pack(new_state, state.layout), metrics

    return jax.jit(step, donate_argnums=0)
