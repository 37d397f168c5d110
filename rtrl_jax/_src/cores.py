"""Recurrent cores: pure step functions ``(params, carry, x) -> (carry, out)`` with their specs.

A :class:`Core` wraps such a function together with what the library needs to know about it: the
shape of one input, the structure of the carry (which may be a pytree, as LSTM's ``(c, h)``), how the
output is read off the carry, and, for Flax cells, the module itself (so that estimators such as
KF-RTRL can find its Dense layers). Cores are for one stream; batches come from ``jax.vmap``.

Adapters:

- :func:`from_linen` for any ``flax.linen`` recurrent cell (``SimpleCell``, ``GRUCell``,
  ``LSTMCell``, ``OptimizedLSTMCell``, ``MGUCell`` or a user's own ``RNNCellBase``);
- :func:`from_nnx` for ``flax.nnx`` cells, through ``nnx.split``/``nnx.merge``;
- :func:`from_function` for a plain JAX function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtrl_jax._src.base import Carry, CoreFn, Input, Output, Params, PRNGKey


def _spec(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _describe(tree: Any) -> str:
    return str(jax.tree.map(lambda a: f"{tuple(jnp.shape(a))}", tree))


def _same_structure_and_shapes(tree: Any, spec: Any) -> bool:
    if jax.tree.structure(tree) != jax.tree.structure(spec):  # type: ignore[operator]  # jaxlib: no stub
        return False
    return all(
        tuple(jnp.shape(a)) == tuple(s.shape)
        for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(spec), strict=True)
    )


def _float_dtypes(tree: Any) -> set:
    return {
        jnp.result_type(a) for a in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    }


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts every floating leaf of ``tree`` to ``dtype`` (integer leaves are kept)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Core:
    """A recurrent core for one stream, with the specs used to validate its inputs.

    Calling a core checks (at trace time, so for free inside ``jit``) that the input, carry and
    parameters match what the core was built for, and raises a ``ValueError`` naming the problem
    otherwise.

    Attributes:
      apply: the step function ``(params, carry, x) -> (carry, out)``.
      output: ``carry -> out``, how the step's output is read off the new carry (for Flax cells the
        output is the hidden state, a leaf of the carry). Estimators track ``d carry/dθ``; a loss on
        the output reaches them through this map.
      input_shape: the shape of one input ``x``.
      params_spec: ``jax.ShapeDtypeStruct`` pytree of the parameters.
      carry_spec: ``jax.ShapeDtypeStruct`` pytree of the carry.
      name: a name for messages (the cell's class name for Flax cells).
      module: the Flax module behind the core, or ``None``.
      init_fn: ``key -> (params, carry)``, or ``None`` for cores built from given arrays.
    """

    apply: CoreFn
    output: Callable[[Carry], Output]
    input_shape: tuple[int, ...]
    params_spec: Any
    carry_spec: Any
    name: str
    module: Any = None
    init_fn: Callable[[PRNGKey], tuple[Params, Carry]] | None = None

    def __call__(self, params: Params, carry: Carry, x: Input) -> tuple[Carry, Output]:
        self.check(params, carry, x)
        return self.apply(params, carry, x)

    def init(self, key: PRNGKey, dtype: Any = None) -> tuple[Params, Carry]:
        """Fresh ``(params, carry)``; floating leaves cast to ``dtype`` when given."""
        if self.init_fn is None:
            raise ValueError(f"core {self.name!r} was built from given arrays and has no init.")
        params, carry = self.init_fn(key)
        if dtype is not None:
            params, carry = cast_floating(params, dtype), cast_floating(carry, dtype)
        return params, carry

    def initial_carry(self, dtype: Any = None) -> Carry:
        """The zero carry of one stream."""
        return jax.tree.map(lambda s: jnp.zeros(s.shape, dtype or s.dtype), self.carry_spec)

    @property
    def carry_size(self) -> int:
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.carry_spec))

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of the step output ``out`` (read off the carry)."""
        return tuple(jax.eval_shape(self.output, self.carry_spec).shape)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.params_spec))

    def check(self, params: Params, carry: Carry, x: Input) -> None:
        """Raises ``ValueError`` if ``params``, ``carry`` or ``x`` do not fit this core."""
        x_shape = tuple(jnp.shape(x))
        if x_shape != tuple(self.input_shape):
            hint = ""
            if x_shape[1:] == tuple(self.input_shape):
                hint = " (a core serves one stream: map it over a batch with jax.vmap)"
            elif x_shape[-1:] != tuple(self.input_shape)[-1:]:
                hint = (
                    f" (input size mismatch: the core takes {self.input_shape[-1]} features,"
                    f" got {x_shape[-1] if x_shape else 'a scalar'})"
                )
            raise ValueError(
                f"{self.name}: input x has shape {x_shape}, expected {tuple(self.input_shape)}{hint}."
            )
        if not _same_structure_and_shapes(carry, self.carry_spec):
            raise ValueError(
                f"{self.name}: carry does not match the cell: expected {_describe(self.carry_spec)},"
                f" got {_describe(carry)}."
            )
        if not _same_structure_and_shapes(params, self.params_spec):
            raise ValueError(
                f"{self.name}: params do not match the cell: expected "
                f"{_describe(self.params_spec)}, got {_describe(params)}."
            )
        dtypes = _float_dtypes(params) | _float_dtypes(carry) | _float_dtypes(x)
        if len(dtypes) > 1:
            raise ValueError(
                f"{self.name}: params, carry and input mix floating dtypes {sorted(map(str, dtypes))};"
                " cast them to one dtype (rtrl_jax.cast_floating)."
            )


def _leaf_reader(treedef: Any, index: int, name: str) -> Callable[[Carry], Output]:
    """``carry -> out``: leaf ``index`` of a carry of structure ``treedef``."""

    def output(c):
        if jax.tree.structure(c) != treedef:
            raise ValueError(f"{name}: carry structure {jax.tree.structure(c)} != {treedef}.")
        return jax.tree.leaves(c)[index]

    return output


def _find_output(apply: CoreFn, params: Params, carry: Carry, x: Input, name: str):
    """Finds which leaf of the new carry the core returns as its output."""
    new_carry, out = apply(params, carry, x)
    leaves = jax.tree.leaves(new_carry)
    treedef = jax.tree.structure(new_carry)
    if jax.tree.structure(out) == treedef and all(  # type: ignore[operator]  # jaxlib: no stub
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), leaves, strict=True)
    ):
        return lambda c: c
    if not isinstance(out, jax.Array):
        raise ValueError(f"{name}: cannot tell how the output is read off the carry; pass output=.")
    matches = [i for i, leaf in enumerate(leaves) if leaf.shape == out.shape and np.array_equal(leaf, out)]
    if len(matches) != 1:
        raise ValueError(
            f"{name}: the cell's output is not a leaf of its carry; build the core with "
            "from_function(..., output=fn) where fn maps the carry to the output."
        )
    return _leaf_reader(treedef, matches[0], name)


def _random_like(key: PRNGKey, tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, jnp.shape(a), jnp.result_type(a)) for k, a in zip(keys, leaves, strict=False)],
    )


def _probe_output(apply: CoreFn, params: Params, carry: Carry, input_shape, name: str):
    key_x, key_c = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, input_shape, jnp.float32)
    return _find_output(apply, params, _random_like(key_c, carry), x, name)


def _traced_output(apply: CoreFn, params_spec: Any, carry_spec: Any, input_shape, name: str):
    """The output map of a cell that returns its carry, or a leaf of it, as the output, found from
    one abstract trace of ``apply`` (``jax.eval_shape``: nothing is computed or allocated); ``None``
    when the output is a value of its own, which only a concrete probe can match to a leaf."""
    found = []

    def step(params, carry, x):
        new_carry, out = apply(params, carry, x)
        leaves = jax.tree.leaves(new_carry)
        same = jax.tree.leaves(out)
        if jax.tree.structure(out) == jax.tree.structure(new_carry) and all(
            a is b for a, b in zip(same, leaves, strict=True)
        ):
            found.append(None)
        elif len(same) == 1:
            found.extend(i for i, leaf in enumerate(leaves) if leaf is same[0])
        return out

    jax.eval_shape(step, params_spec, carry_spec, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    if found == [None]:
        return lambda c: c
    if len(found) != 1:
        return None
    return _leaf_reader(jax.tree.structure(carry_spec), found[0], name)


def _flax_core(apply: CoreFn, init_fn, input_shape: tuple[int, ...], name: str, module: Any) -> Core:
    """A core whose specs come from an abstract initialisation of a Flax cell (``jax.eval_shape``).

    Nothing of the cell's size is allocated when its output is its carry or a leaf of it (every
    Flax cell, every cell of this library): a core for a model too large for the machine costs
    shapes only, so its memory can be estimated before anything is allocated. A cell whose output
    is a value of its own is probed once with concrete arrays to find the leaf it equals.
    """
    params_spec, carry_spec = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    )
    output = _traced_output(apply, params_spec, carry_spec, input_shape, name)
    if output is None:
        params, carry = init_fn(jax.random.PRNGKey(0))
        output = _probe_output(apply, params, carry, input_shape, name)
    return Core(
        apply=apply,
        output=output,
        input_shape=input_shape,
        params_spec=params_spec,
        carry_spec=carry_spec,
        name=name,
        module=module,
        init_fn=init_fn,
    )


def from_linen(cell: Any, input_size: int, *, name: str | None = None) -> Core:
    """A core from a ``flax.linen`` recurrent cell.

    Args:
      cell: a linen module with the ``RNNCellBase`` calling convention
        ``cell(carry, x) -> (carry, out)`` and ``cell.initialize_carry(key, input_shape)``.
      input_size: the number of input features of one step.
      name: a name for messages (defaults to the cell's class name).

    Returns:
      A :class:`Core` whose ``apply`` is ``cell.apply({"params": params}, carry, x)``.

    Example:
      >>> import flax.linen as nn, jax
      >>> core = from_linen(nn.GRUCell(features=8), input_size=3)
      >>> params, carry = core.init(jax.random.PRNGKey(0))
      >>> carry, out = core(params, carry, jax.numpy.ones(3))
    """
    if not isinstance(input_size, int | np.integer) or input_size <= 0:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}.")
    if not (hasattr(cell, "initialize_carry") and hasattr(cell, "apply")):
        raise TypeError(
            f"from_linen needs a flax.linen recurrent cell (RNNCellBase), got {type(cell).__name__}."
        )
    name = name or type(cell).__name__
    input_shape = (int(input_size),)

    def init_fn(key):
        key_carry, key_params = jax.random.split(key)
        carry = cell.initialize_carry(key_carry, input_shape)
        params = cell.init(key_params, carry, jnp.zeros(input_shape))["params"]
        return params, carry

    def apply(params, carry, x):
        return cell.apply({"params": params}, carry, x)

    return _flax_core(apply, init_fn, input_shape, name, cell)


def from_nnx(cell: Any, input_size: int | None = None, *, name: str | None = None) -> Core:
    """A core from a ``flax.nnx`` recurrent cell.

    The parameters are the cell's ``nnx.Param`` variables as a plain nested dict
    (``nnx.to_pure_dict``), so any Optax optimizer consumes them; other state of the cell is kept
    as it was when the core was built.

    Args:
      cell: an nnx module with ``cell(carry, x) -> (carry, out)`` and
        ``cell.initialize_carry(input_shape, rngs)``.
      input_size: the number of input features (defaults to the cell's ``in_features``).
      name: a name for messages (defaults to the cell's class name).

    Returns:
      A :class:`Core`; ``core.init(key)`` returns the cell's own parameters and a zero carry (the key
      only seeds the carry initialiser).
    """
    from flax import nnx

    name = name or type(cell).__name__
    if input_size is None:
        input_size = getattr(cell, "in_features", None)
        if input_size is None:
            raise ValueError(f"{name}: pass input_size= (the cell has no in_features).")
    input_shape = (int(input_size),)
    graphdef, param_state, rest = nnx.split(cell, nnx.Param, ...)  # type: ignore[misc]  # flax's overloads
    params0 = nnx.to_pure_dict(param_state)

    def apply(params, carry, x):
        state = jax.tree.map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state, rest)(carry, x)

    def init_fn(key):
        carry = cell.initialize_carry(input_shape, nnx.Rngs(key))
        return jax.tree.map(jnp.asarray, params0), carry

    return _flax_core(apply, init_fn, input_shape, name, cell)


def from_function(
    apply: CoreFn,
    *,
    params: Params,
    carry: Carry,
    input_shape: tuple[int, ...],
    output: Callable[[Carry], Output] | None = None,
    name: str = "core",
) -> Core:
    """A core from a plain step function ``(params, carry, x) -> (carry, out)``.

    Args:
      apply: the step function.
      params: example parameters (their structure, shapes and dtypes become the spec).
      carry: example carry.
      input_shape: the shape of one input.
      output: ``carry -> out``; found automatically when the output is the carry or one of its
        leaves.
      name: a name for messages.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if output is None:
        output = _probe_output(apply, params, carry, input_shape, name)
    return Core(
        apply=apply,
        output=output,
        input_shape=input_shape,
        params_spec=_spec(params),
        carry_spec=_spec(carry),
        name=name,
        init_fn=lambda key: (params, carry),
    )
