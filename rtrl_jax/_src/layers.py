"""Online recurrent layers for whole Flax models: a trace per recurrent layer.

A model with recurrent layers ``l = 1..L``, ``h^l_t = F^l(h^l_{t-1}, x^l_t; θ^l)`` where ``x^l_t`` is
what the layers below produce at step ``t`` (through encoders, embeddings, norms, residuals), and a
per-step loss ``L_t`` trains online as follows:

- each layer keeps its own trace ``J^l_t ≈ ∂h^l_t/∂θ^l`` with its inputs ``x^l_s`` taken as given
  (any registered estimator; the cost is that layer's alone);
- at step ``t`` reverse mode runs through the feed-forward graph of step ``t`` only:
  ``c^L_t = ∂L_t/∂h^L_t``, and the cotangent that reaches a layer's input is
  ``c^l_t · ∂F^l/∂x^l_t`` (one VJP of the cell), passed down to whatever produced ``x^l_t``;
- layer ``l``'s parameter gradient is ``c^l_t · J^l_t``.

Each layer is :func:`~rtrl_jax.online_step` over its own core, so all of this comes from the user's
unchanged ``jax.grad`` of ``L_t``.

What is dropped, and when the gradient is exact:

- dropped is the influence of ``θ^l`` (and of everything below layer ``l``) on *later* states of the
  layers above through their recurrences: ``∂h^{l+1}_t/∂h^{l+1}_{t-1} · ∂h^{l+1}_{t-1}/∂x^{l+1}_{t-1}
  ...`` is never formed. Keeping it would take the influence of ``θ^l`` on the states of every
  layer above, a trace the size of the whole stack's; dropping it keeps each layer's cost its own.
  The per-layer gradient equals BPTT through a graph in which every layer's input is cut
  (``lax.stop_gradient``) at every step but the current one.
- one recurrent layer: the head's and the layer's gradients are exact (with an exact estimator);
  an encoder or embedding below it gets only the current-step path. To make it exact, fold the
  encoder into the layer's core (:class:`StackedCell`), so the trace covers its parameters too.
- in general, the gradient of ``θ^l`` is exact (with exact estimators) when no layer above ``l``
  carries state through time, e.g. when the layers above have no recurrence (``F^{l'}`` ignores
  ``h^{l'}_{t-1}``): then there is no path to drop.
- a whole stack as ONE core (``OnlineRNN(StackedCell([...]))``, in nnx
  ``NNXOnlineRNN(NNXStackedCell([...]))``) with exact RTRL is exact BPTT, at the whole stack's cost
  ``S²P``: the comparison point for the per-layer traces.

Zucchet et al. 2023, "Online learning of long-range dependencies" (arXiv:2305.15947), train deep
stacks of element-wise recurrent layers this way (exact per-layer traces) and find it competitive
with BPTT.

Example (linen; the nnx layer is :class:`NNXOnlineRNN`)::

    import flax.linen as nn, jax, optax, rtrl_jax as rj

    model = nn.Sequential([
        nn.Embed(num_embeddings=27, features=8),                  # encoder: current-step gradient
        rj.OnlineRNN(nn.GRUCell(16), "snap"),                     # SnAp-1 trace
        rj.OnlineRNN(nn.GRUCell(16), "kf"),                       # KF-RTRL trace (stochastic)
        nn.Dense(32), nn.relu, nn.Dense(27),                      # MLP head: exact gradient
    ])
    tokens = jax.random.randint(jax.random.key(0), (20, 4), 0, 27)  # 20 steps, 4 streams
    variables = model.init(jax.random.key(1), tokens[0])
    params, state = variables["params"], {"online": variables["online"]}
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def loss(params, state, x, y):  # the per-step loss, as the user writes it
        logits, state = model.apply({"params": params, **state}, x, mutable=["online"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    def train_step(carried, batch):  # one step of the streams: batch.inputs, batch.targets
        params, opt_state, state = carried
        grad_fn = jax.value_and_grad(loss, has_aux=True)
        (value, state), grads = grad_fn(params, state, batch.inputs, batch.targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, state), value

    step = rj.live_step(train_step)  # jitted once, the packed state donated: rtrl_jax.live_step
    packed = rj.pack_state((params, opt_state, state))  # rj.unpack_state(packed) gives them back
    for x, y in zip(tokens[:-1], tokens[1:]):
        packed, value = step(packed, x, y)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from rtrl_jax._src.base import (
    Carry,
    Estimator,
    Input,
    Output,
    Params,
    PRNGKey,
    Trace,
    no_observation,
    restart_trace,
)
from rtrl_jax._src.cores import Core, from_linen, from_nnx
from rtrl_jax._src.online import online_step
from rtrl_jax._src.registry import get_estimator_info, make_estimator


class OnlineCore(NamedTuple):
    """What an online layer runs: its core, the estimator built for it, and whether it draws keys.

    Attributes:
      core: the layer's :class:`~rtrl_jax.Core` (one stream).
      estimator: the estimator built for ``core``.
      needs_key: whether ``estimator`` needs a random ``key=``.
    """

    core: Core
    estimator: Estimator
    needs_key: bool


def build_online_core(layer: str, core: Core, estimator: str, options: Mapping[str, Any]) -> OnlineCore:
    """Builds the registered ``estimator`` with ``options`` for ``core``.

    Args:
      layer: the layer's name, for messages.
      core: the layer's core.
      estimator: a registered estimator name (:func:`~rtrl_jax.registered`).
      options: the estimator's keyword options.

    Raises:
      ValueError: naming ``layer``, for an unknown estimator or option, a cell the estimator
        cannot serve, or an estimator that learns from the loss's cotangent (``observe``: DNI).
    """
    try:
        info = get_estimator_info(estimator)
        built = make_estimator(estimator, core, **dict(options))
    except ValueError as error:
        raise ValueError(f"online layer {layer!r}: {error}") from None
    if built.observe is not no_observation:
        raise ValueError(
            f"online layer {layer!r}: estimator {estimator!r} learns from the step loss's cotangent"
            " (Estimator.observe), which a layer's custom_vjp step cannot hand back to its trace;"
            " train it as one core (rtrl_jax.make_train_step / train_online)."
        )
    return OnlineCore(core, built, info.needs_key)


@functools.lru_cache(maxsize=64)
def _linen_online_core(layer: str, cell: nn.Module, input_size: int, estimator: str, options, x64: bool):
    del x64  # a cache key only: cores probed with and without float64 are kept apart
    with jax.ensure_compile_time_eval():
        return build_online_core(layer, from_linen(cell, input_size), estimator, dict(options))


def linen_online_core(
    layer: str, cell: nn.Module, input_size: int, estimator: str, options: Mapping[str, Any]
) -> OnlineCore:
    """The :class:`OnlineCore` of a linen cell, built once per (cell, input size, estimator, options).

    It probes the cell with concrete arrays, so it may be called while tracing (inside ``jit``,
    ``grad`` or a linen module's ``__call__``).
    """
    cell = cell.clone(parent=None, name=None)
    items = tuple(sorted(dict(options).items()))
    x64 = jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64
    try:
        hash((cell, items))
    except TypeError:  # an unhashable option (an array) or cell: build without the cache
        return _linen_online_core.__wrapped__(layer, cell, input_size, estimator, items, x64)
    return _linen_online_core(layer, cell, input_size, estimator, items, x64)


def _where(flag: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _stream_keys(key: PRNGKey | None, batch: int) -> PRNGKey | None:
    return None if key is None else jax.random.split(key, batch)


def init_streams(
    online: OnlineCore, params: Params, batch: int, dtype: Any, key: PRNGKey | None = None
) -> tuple[Carry, Trace]:
    """Fresh carries and traces for ``batch`` streams (leading axis ``batch``).

    Args:
      online: the layer's core and estimator.
      params: the core's parameters.
      batch: the number of streams.
      dtype: the floating dtype of the carry.
      key: a random key when ``online.needs_key`` (one per stream is split off it).

    Returns:
      ``(carry, trace)``.
    """
    carry = online.core.initial_carry(dtype)
    carries = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), carry)
    init = functools.partial(online.estimator.init, params)
    keys = _stream_keys(key if online.needs_key else None, batch)
    traces = jax.vmap(lambda c, k: init(c, key=k))(carries, keys)
    return carries, traces


def step_streams(
    online: OnlineCore,
    params: Params,
    trace: Trace,
    carry: Carry,
    x: Input,
    reset: jax.Array | None = None,
    key: PRNGKey | None = None,
) -> tuple[Carry, Output, Trace]:
    """One online step of a batch of streams that share ``params`` (the drop-in, vmapped).

    Under ``jax.grad`` of a loss of the outputs, ``params`` get ``Σ_b c_{b,t} · J_{b,t}`` and
    ``x[b]`` gets ``c_{b,t} · ∂F/∂x_{b,t}`` (:func:`~rtrl_jax.online_step`); ``trace`` and
    ``carry`` get zero.

    Args:
      online: the layer's core and estimator.
      params: the core's parameters, shared by the streams.
      trace: the traces, leading axis ``batch``.
      carry: the carries, leading axis ``batch``.
      x: the inputs of this step, leading axis ``batch``.
      reset: optional ``(batch,)`` booleans: the streams that start afresh at this step (their
        carry is re-initialised and their trace restarted, :func:`~rtrl_jax.restart_trace`,
        before the step).
      key: the step's random key when ``online.needs_key``.

    Returns:
      ``(carry, out, trace)`` for the batch.
    """
    step = online_step(online.core, online.estimator)
    batch = jax.tree.leaves(x)[0].shape[0]
    keys = _stream_keys(key if online.needs_key else None, batch)

    def one(trace, carry, x, reset, key):
        if reset is not None:
            init_key = None
            if key is not None:
                init_key, key = jax.random.split(key)
            fresh_carry = jax.tree.map(jnp.zeros_like, carry)
            restarted = restart_trace(online.estimator, trace, params, fresh_carry, key=init_key)
            carry = _where(reset, fresh_carry, carry)
            trace = _where(reset, restarted, trace)
        return step(params, trace, carry, x, key)

    return jax.vmap(one)(trace, carry, x, reset, keys)


def _is_recurrent(module: Any) -> bool:
    return hasattr(module, "initialize_carry")


def _run_stack(layers: Sequence[Any], carry: tuple, x: jax.Array) -> tuple[tuple, jax.Array]:
    """One step of a stack as one cell: each recurrent layer advances its carry, the others map."""
    carries = iter(carry)
    new = []
    for layer in layers:
        if _is_recurrent(layer):
            layer_carry, x = layer(next(carries), x)
            new.append(layer_carry)
        else:
            x = layer(x)
    return tuple(new), x


def _stack_carries(
    name: str, layers: Sequence[Any], input_shape: tuple[int, ...], carry_and_output: Callable
) -> tuple:
    """The initial carries of a stack's recurrent layers, the running shape found layer by layer.

    ``carry_and_output(layer, x_spec) -> (carry or None, output spec)``.
    """
    if not layers or not _is_recurrent(layers[-1]):
        raise ValueError(f"{name}: the last layer must be a recurrent cell.")
    carries = []
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    for layer in layers:
        carry, x = carry_and_output(layer, x)
        if carry is not None:
            carries.append(carry)
    return tuple(carries)


def _output_spec(layer: Any, key: PRNGKey, *args: Any) -> Any:
    """The shapes and dtypes of ``layer(*args)`` (a linen module, initialised on the fly, or a function)."""
    if not isinstance(layer, nn.Module):
        return jax.eval_shape(layer, *args)
    layer = layer.clone(parent=None)
    return jax.eval_shape(lambda *a: layer.init_with_output(key, *a)[0], *args)


def _check_batched(layer: str, x: jax.Array) -> None:
    if jnp.ndim(x) != 2:
        raise ValueError(
            f"online layer {layer!r}: inputs need a leading batch axis, (batch, features); "
            f"got shape {tuple(jnp.shape(x))} (one stream: x[None])."
        )


class OnlineRNN(nn.Module):
    """A ``flax.linen`` recurrent layer trained online by a registered estimator.

    One call is one time step for a batch of streams. The layer holds its carry and trace in the
    variable collection ``collection`` (``"online"``): pass it with the parameters and apply with
    ``mutable=[collection]`` to advance it (without, the step is computed and not stored). Under
    ``jax.grad`` of the step's loss the cell's parameters get the estimator's ``c_t · J_t`` (summed
    over streams) and the input gets ``c_t · ∂h_t/∂x_t``, so layers below it train too; nothing
    flows into past steps (see the module docstring for what that drops).

    With ``h_t = F(h_{t-1}, x_t; θ)`` the cell, ``J_t ≈ ∂h_t/∂θ`` its trace (inputs taken as given)
    and ``c_t = ∂L_t/∂h_t`` what reaches the layer from above at step ``t``::

        ∂L_t/∂θ  ≈ c_t · J_t              (exact with an exact estimator and nothing recurrent above)
        ∂L_t/∂x_t = c_t · ∂F/∂x_t         (exact for step t; no path through h_{t-1} into the past)

    The cell's parameters live under ``params/<layer>/core`` with the cell's own structure.
    Estimators that need a random key draw one per step from the rng stream ``rng_stream`` when the
    apply call has it (``rngs={"online": key}``), otherwise from a key stored in the collection.
    A cell the estimator cannot serve raises a ``ValueError`` naming the layer.

    Reference: Zucchet et al. 2023, "Online learning of long-range dependencies",
    arXiv:2305.15947 (a trace per layer, gradients across layers at the current step).

    Attributes:
      cell: a linen recurrent cell (``cell(carry, x) -> (carry, out)``, ``initialize_carry``):
        ``nn.GRUCell``, ``nn.LSTMCell``, the library's cells, a :class:`StackedCell`.
      estimator: a registered estimator name (``"rtrl"``, ``"kf"``, ``"snap"``, ...).
      options: the estimator's keyword options (``{"rank": 2}`` for ``"ok"``).
      collection: the variable collection that holds ``carry``, ``trace`` (and ``key``).
      rng_stream: the rng stream stochastic estimators draw from when present.

    Call args:
      x: ``(batch, features)`` inputs of this step.
      reset: optional ``(batch,)`` booleans: streams that start a new episode at this step.

    Returns:
      The cell's outputs, ``(batch, ...)``.

    Example::

        model = nn.Sequential([nn.Dense(16), OnlineRNN(nn.GRUCell(16), "kf"), nn.Dense(4)])
        variables = model.init(key, x0)                      # x0: (batch, features)
        out, state = model.apply(variables, x, mutable=["online"])
    """

    cell: nn.Module
    estimator: str = "rtrl"
    options: Mapping[str, Any] = FrozenDict()
    collection: str = "online"
    rng_stream: str = "online"

    def _layer_name(self) -> str:
        return "/".join(self.path) or self.name or type(self).__name__

    @nn.compact
    def __call__(self, x: jax.Array, reset: jax.Array | None = None) -> Output:
        layer = self._layer_name()
        _check_batched(layer, x)
        online = linen_online_core(layer, self.cell, int(x.shape[-1]), self.estimator, self.options)
        params = self.param("core", lambda key: online.core.init(key)[0])
        batch = x.shape[0]
        key = None
        if online.needs_key:
            stored = self.variable(self.collection, "key", lambda: self.make_rng("params"))
            if self.has_rng(self.rng_stream):
                key = self.make_rng(self.rng_stream)
            else:
                next_key, key = jax.random.split(stored.value)
                if self._stores():
                    stored.value = next_key
        if not self.has_variable(self.collection, "carry"):
            init_key = None if key is None else jax.random.fold_in(key, 0)
            fresh = init_streams(online, params, batch, x.dtype, init_key)
        carry = self.variable(self.collection, "carry", lambda: fresh[0])
        trace = self.variable(self.collection, "trace", lambda: fresh[1])
        new_carry, out, new_trace = step_streams(online, params, trace.value, carry.value, x, reset, key)
        if self._stores():
            carry.value, trace.value = new_carry, new_trace
        return out

    def _stores(self) -> bool:
        return self.is_mutable_collection(self.collection) and not self.is_initializing()


class StackedCell(nn.RNNCellBase):
    """Several linen layers run in sequence within one step, as ONE recurrent cell.

    Recurrent cells (modules with ``initialize_carry``) keep a carry each (the carry is the tuple of
    them); other modules (``nn.Dense``, ``nn.LayerNorm``, ``nn.relu`` ...) map the running value.
    Wrapped in :class:`OnlineRNN`, one trace covers every parameter of the stack: with exact RTRL
    the gradient is exact BPTT, including the cross-layer paths through time that per-layer traces
    drop, at the whole stack's cost. Folding a feed-forward encoder in front of one recurrent cell
    this way makes the encoder's gradient exact too.

    Attributes:
      layers: the modules, applied in order; the last one must be recurrent (the cell's output
        is read off its carry).

    Example::

        OnlineRNN(StackedCell([nn.Dense(8), nn.GRUCell(16), nn.GRUCell(16)]), "rtrl")
    """

    layers: Sequence[nn.Module]

    def __call__(self, carry: tuple, x: jax.Array) -> tuple[tuple, jax.Array]:
        return _run_stack(self.layers, carry, x)

    @nn.nowrap
    def initialize_carry(self, rng: PRNGKey, input_shape: tuple[int, ...]) -> tuple:
        keys = iter(jax.random.split(rng, len(self.layers)))

        def carry_and_output(layer, x):
            key = next(keys)
            if not _is_recurrent(layer):
                return None, _output_spec(layer, key, x)
            carry = layer.initialize_carry(key, x.shape)
            return carry, _output_spec(layer, key, carry, x)[1]

        return _stack_carries("StackedCell", self.layers, input_shape, carry_and_output)

    @property
    def num_feature_axes(self) -> int:
        return 1


class OnlineState(nnx.Variable):
    """The nnx variable type of an online layer's carries, traces and key (not parameters)."""


class _Built:
    """Holds an :class:`OnlineCore` as a static, identity-hashed attribute of an nnx module."""

    def __init__(self, online: OnlineCore):
        self.online = online


class NNXOnlineRNN(nnx.Module):
    """A ``flax.nnx`` recurrent layer trained online by a registered estimator.

    The nnx counterpart of :class:`OnlineRNN`: one call is one time step for ``batch_size`` streams;
    the cell's ``nnx.Param`` variables are the layer's parameters (under ``nnx.grad`` they get the
    estimator's ``c_t · J_t``, the input gets ``c_t · ∂h_t/∂x_t``), and the carries, traces and the
    key of stochastic estimators are :class:`OnlineState` variables, updated in place.

    Args:
      cell: an nnx recurrent cell (``cell(carry, x) -> (carry, out)``,
        ``initialize_carry(input_shape, rngs)``), e.g. ``nnx.GRUCell``.
      estimator: a registered estimator name.
      batch_size: the number of streams.
      rngs: seeds the key of stochastic estimators.
      options: the estimator's keyword options.
      input_size: the input features (defaults to the cell's ``in_features``).
      name: the layer's name in messages (defaults to the cell's class name).

    Raises:
      ValueError: naming the layer, for an estimator that cannot serve the cell (the Kronecker
        estimators ``"kf"`` and ``"ok"`` need a linen cell).

    Example::

        rnn = NNXOnlineRNN(nnx.GRUCell(8, 16, rngs=rngs), "snap", batch_size=4, rngs=rngs)
        out = rnn(x)  # x: (4, 8)
    """

    def __init__(
        self,
        cell: nnx.Module,
        estimator: str = "rtrl",
        *,
        batch_size: int,
        rngs: nnx.Rngs,
        options: Mapping[str, Any] | None = None,
        input_size: int | None = None,
        name: str | None = None,
    ):
        self.name = name or type(cell).__name__
        core = from_nnx(cell, input_size, name=type(cell).__name__)
        online = build_online_core(self.name, core, estimator, options or {})
        self.cell = cell
        self.built = _Built(online)
        params = nnx.to_pure_dict(nnx.state(cell, nnx.Param))
        dtype = jnp.result_type(*jax.tree.leaves(params))
        key = rngs() if online.needs_key else None
        self.key = OnlineState(key) if online.needs_key else None
        init_key = None if key is None else jax.random.fold_in(key, 0)
        carry, trace = init_streams(online, params, batch_size, dtype, init_key)
        self.carry, self.trace = OnlineState(carry), OnlineState(trace)

    def __call__(self, x: jax.Array, reset: jax.Array | None = None) -> Output:
        _check_batched(self.name, x)
        online = self.built.online
        key = None
        if self.key is not None:
            next_key, key = jax.random.split(self.key.get_value())
            self.key.set_value(next_key)
        params = nnx.to_pure_dict(nnx.state(self.cell, nnx.Param))
        carry, out, trace = step_streams(
            online, params, self.trace.get_value(), self.carry.get_value(), x, reset, key
        )
        self.carry.set_value(carry)
        self.trace.set_value(trace)
        return out


class NNXStackedCell(nnx.Module):
    """Several nnx layers run in sequence within one step, as ONE recurrent cell.

    The nnx counterpart of :class:`StackedCell`: recurrent cells (modules with
    ``initialize_carry``) keep a carry each (the carry is the tuple of them), other modules
    (``nnx.Linear``, ``nnx.LayerNorm``, functions) map the running value. In
    :class:`NNXOnlineRNN`, one trace covers every parameter of the stack: with exact RTRL the
    gradient is exact BPTT, cross-layer paths through time included, at the whole stack's cost
    ``S²P``; an encoder folded in front of one recurrent cell gets its exact gradient this way.

    Args:
      layers: the modules, applied in order; the last one must be recurrent (the cell's output
        is read off its carry).

    Raises:
      ValueError: when the last layer is not recurrent.

    Example::

        cell = NNXStackedCell([nnx.GRUCell(8, 16, rngs=rngs), nnx.GRUCell(16, 16, rngs=rngs)])
        rnn = NNXOnlineRNN(cell, "rtrl", batch_size=4, rngs=rngs)
    """

    def __init__(self, layers: Sequence[Any]):
        if not layers or not _is_recurrent(layers[-1]):
            raise ValueError("NNXStackedCell: the last layer must be a recurrent cell.")
        self.layers = nnx.List(layers)

    def __call__(self, carry: tuple, x: jax.Array) -> tuple[tuple, jax.Array]:
        return _run_stack(self.layers, carry, x)

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: nnx.Rngs) -> tuple:
        def carry_and_output(layer, x):
            if not _is_recurrent(layer):
                return None, jax.eval_shape(layer, x)
            carry = layer.initialize_carry(x.shape, rngs)
            return carry, jax.eval_shape(lambda c, x: layer(c, x)[1], carry, x)

        return _stack_carries("NNXStackedCell", self.layers, input_shape, carry_and_output)

    @property
    def in_features(self) -> int | None:
        """The first layer's ``in_features`` (``None`` if it has none: pass ``input_size=``)."""
        return getattr(self.layers[0], "in_features", None)


def model_definition(model: nn.Module | nnx.Module | nnx.GraphDef) -> nn.Module | nnx.GraphDef:
    """What a trainer keeps of a whole model: a linen module as it is, an nnx module's ``GraphDef``.

    Both compare and hash by value, so a trainer's jitted step can be cached on them.
    """
    return nnx.graphdef(model) if isinstance(model, nnx.Module) else model


def split_model(variables: Mapping[str, Any] | nnx.Module) -> tuple[Params, Any]:
    """A whole model's ``(trainable parameters, online state)``.

    Args:
      variables: a linen model's variables (``model.init(...)``): ``"params"`` and the collections
        that hold the carries and traces; or an nnx module, split into its ``nnx.Param`` state and
        the rest (:class:`OnlineState`, rng counts, batch statistics).
    """
    if isinstance(variables, nnx.Module):
        _, params, online = nnx.split(variables, nnx.Param, ...)  # type: ignore[misc]  # flax's overloads
        return params, online
    return variables["params"], {name: value for name, value in variables.items() if name != "params"}


def apply_model(
    model: nn.Module | nnx.GraphDef,
    params: Params,
    online: Any,
    x: Input,
    reset: jax.Array,
    rngs: Mapping[str, PRNGKey],
) -> tuple[Output, Any]:
    """One step of a whole model as a pure function: ``(outputs, new online state)``.

    A linen model is applied with its online collections mutable and the rng streams ``rngs``; an
    nnx model (its ``GraphDef``, :func:`model_definition`) is merged with ``params`` and ``online``,
    called, and split again (it draws keys from its own ``nnx.Rngs`` and stored keys, not ``rngs``).
    Either is called as ``model(x, reset)``.
    """
    if isinstance(model, nnx.GraphDef):
        module = nnx.merge(model, params, online, copy=True)
        out = module(x, reset)
        return out, split_model(module)[1]
    return model.apply({"params": params, **online}, x, reset, mutable=[*online], rngs=dict(rngs))
