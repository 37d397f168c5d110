"""Online training: one step of the core, the trace and an Optax update per stream step.

At every step ``t`` of a batch of independent streams the trainer

1. resets the carry and restarts the trace of the streams whose episode starts at ``t``
   (:func:`~rtrl_jax.restart_trace`: what a trace has learned, e.g. DNI's synthetic-gradient map,
   is kept);
2. advances core and trace with ``estimator.step``;
3. computes the step loss through the readout head (ordinary autodiff for the head);
4. gets the recurrent gradient from the estimator (``grad`` of the loss's carry cotangent ``c_t``),
   shows ``c_t`` to the trace (``observe``), averages the gradient over the batch, and
5. applies any ``optax.GradientTransformation`` (every step, or every ``k`` steps through
   ``optax.MultiSteps``).

Everything a run needs between steps is the :class:`OnlineTrainState` pytree, so a whole run is one
``jax.lax.scan`` and can be stopped and resumed between chunks.

A whole Flax model trains the same way (:func:`make_model_train_step`, :func:`train_model_online`):
a linen module with :class:`~rtrl_jax.OnlineRNN` layers, or an nnx module with
:class:`~rtrl_jax.NNXOnlineRNN` layers (encoders, norms, residuals, any head), and any per-step
loss. Its recurrent layers keep their carries and traces in the model's ``"online"`` collection
(nnx: its :class:`~rtrl_jax.OnlineState` variables), which the :class:`ModelTrainState` carries
between steps; ``jax.grad`` of the batch's step loss gives every parameter its online gradient
(per-layer traces, gradients across layers at the current step: see :mod:`rtrl_jax._src.layers`
for what that computes). Both kinds of step share the non-finite guard, the metrics and the jitted
chunks.

Numerical guard: every step checks the loss, the gradient, the new carries and traces and the
updated parameters for non-finite values. Under the default policy ``"skip"`` a bad step leaves the
parameters and optimizer state unchanged and starts the carries and traces of all streams afresh
(``init``; a whole model's layers restart theirs at its next step, keeping what the traces of the
last finite step had learned); under ``"stop"`` the run also halts after that step
(:class:`NonFiniteError` from :func:`train_online`); ``"ignore"`` applies the update anyway. The
quantities found are in ``StepMetrics.nonfinite`` (bit flags, :func:`nonfinite_names`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rtrl_jax._src.base import Estimator, Params, restart_trace
from rtrl_jax._src.cores import Core
from rtrl_jax._src.layers import apply_model, model_definition, split_model
from rtrl_jax._src.online import carry_cotangent
from rtrl_jax._src.tasks import Source, Stream

NONFINITE_POLICIES = ("skip", "stop", "ignore")
"""What a step with a non-finite value does: see :func:`make_train_step`."""


class Head(NamedTuple):
    """A readout from the core's output to logits.

    Attributes:
      init: ``(key, out_size, num_classes, dtype) -> head_params``.
      apply: ``(head_params, out) -> logits``.
    """

    init: Callable[..., Params]
    apply: Callable[[Params, jax.Array], jax.Array]


def linear_head() -> Head:
    """A dense readout ``logits = out @ W + b`` with ``W`` scaled by ``1/sqrt(out_size)``."""

    def init(key, out_size, num_classes, dtype=jnp.float32):
        scale = 1.0 / float(np.sqrt(out_size))
        kernel = scale * jax.random.normal(key, (out_size, num_classes), dtype)
        return {"kernel": kernel, "bias": jnp.zeros((num_classes,), dtype)}

    def apply(head_params, out):
        return out @ head_params["kernel"] + head_params["bias"]

    return Head(init, apply)


_LINEAR_HEAD = linear_head()


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of ``softmax(logits)`` against target probabilities."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


class OnlineTrainState(NamedTuple):
    """Everything an online run carries from one step to the next (a pytree).

    Attributes:
      step: the number of stream steps taken.
      params: ``{"core": core params, "head": head params}``, the trainable parameters.
      opt_state: the optimizer state of ``params``.
      carry: the carries of the streams, leading axis batch.
      trace: the estimator traces of the streams, leading axis batch.
      key: the random key for the next step.
    """

    step: jax.Array
    params: Params
    opt_state: Any
    carry: Any
    trace: Any
    key: jax.Array


class StepMetrics(NamedTuple):
    """Per-step metrics, summed over the batch.

    Attributes:
      loss: the summed weighted step loss.
      weight: the summed loss weights (``mask``), so ``loss / weight`` is the mean loss.
      correct: the summed weights of streams whose argmax prediction matches the target's.
      grad_norm: the norm of the batch-mean gradient.
      nonfinite: 0 for a finite step, else the bit flags of :data:`NONFINITE_FLAGS` of the quantities
        that held a NaN or infinity (:func:`nonfinite_names` reads them).
    """

    loss: jax.Array | np.ndarray
    weight: jax.Array | np.ndarray
    correct: jax.Array | np.ndarray
    grad_norm: jax.Array | np.ndarray
    nonfinite: jax.Array | np.ndarray


NONFINITE_FLAGS = {"loss": 1, "grad": 2, "carry": 4, "trace": 8, "params": 16}


def nonfinite_names(flags: int) -> list[str]:
    """The quantities named by the bit flags of ``StepMetrics.nonfinite``, e.g. ``["loss", "grad"]``."""
    return [name for name, bit in NONFINITE_FLAGS.items() if int(flags) & bit]


class NonFiniteError(FloatingPointError):
    """A non-finite value under the ``"stop"`` policy.

    Attributes:
      step: the 1-based step whose values were not finite.
      quantities: their names (``loss``, ``grad``, ``carry``, ``trace``, ``params``).
      state: the state after that step (its update skipped, carries and traces restarted; a whole
        model's restart at its next step): training can resume from it.
      metrics: the per-step metrics up to and including that step.
    """

    def __init__(self, step: int, quantities: list[str], state: Any = None, metrics: Any = None):
        super().__init__(
            f"non-finite {', '.join(quantities)} at step {step}; the update was skipped and the run "
            "stopped (policy 'stop'; 'skip' would go on)."
        )
        self.step, self.quantities, self.state, self.metrics = step, quantities, state, metrics


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (True for a tree without floating leaves)."""
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _select(flags: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Per-stream choice between two batched pytrees (``flags`` has the batch shape)."""

    def pick(a, b):
        return jnp.where(flags.reshape(flags.shape + (1,) * (a.ndim - flags.ndim)), a, b)

    return jax.tree.map(pick, on_true, on_false)


def _broadcast(tree: Any, batch_size: int) -> Any:
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch_size, *jnp.shape(a))), tree)


def init_train_state(
    core: Core,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    core_params: Params,
    head_params: Params,
    *,
    batch_size: int,
    key: jax.Array,
) -> OnlineTrainState:
    """The state at the start of a run: zero carries and fresh traces for ``batch_size`` streams."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    dtype = jnp.result_type(*jax.tree.leaves(core_params))
    carry = core.initial_carry(dtype)
    trace_keys = jax.random.split(jax.random.fold_in(key, 1), batch_size)
    trace = jax.vmap(lambda k: estimator.init(core_params, carry, key=k))(trace_keys)
    params = {"core": core_params, "head": head_params}
    return OnlineTrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        carry=_broadcast(carry, batch_size),
        trace=trace,
        key=jax.random.fold_in(key, 2),
    )


def make_train_step(
    core: Core,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    *,
    head: Head | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    nonfinite: str = "skip",
) -> Callable[[OnlineTrainState, Stream], tuple[OnlineTrainState, StepMetrics]]:
    """One online step for a batch of streams.

    Args:
      core: the recurrent core.
      estimator: an estimator built for ``core``.
      optimizer: any Optax transformation of ``{"core": ..., "head": ...}`` gradients; wrap it in
        ``optax.MultiSteps`` to update every ``k`` steps.
      head: the readout (default :func:`linear_head`).
      loss_fn: ``(logits, targets) -> scalar`` loss of one step of one stream.
      nonfinite: what a step with a non-finite loss, gradient, carry, trace or updated parameter
        does: ``"skip"`` (keep parameters and optimizer state, start all carries and traces
        afresh from ``init``, learned parts of the traces included),
        ``"stop"`` (the same; :func:`make_train_chunk` then halts) or ``"ignore"`` (update anyway).

    Returns:
      ``train_step(state, batch) -> (state, metrics)`` where ``batch`` is a :class:`Stream` slice
      for one time step (leading axis batch). Pure; jit it or scan it.
    """
    _check_policy(nonfinite)
    head = head or _LINEAR_HEAD

    def stream_step(params, trace, carry, x, target, weight, key):
        new_carry, out, new_trace = estimator.step(trace, params["core"], carry, x, key=key)

        def step_loss(head_params, out):
            logits = head.apply(head_params, out)
            return weight * loss_fn(logits, target), logits

        (loss, logits), (head_bar, out_bar) = jax.value_and_grad(step_loss, argnums=(0, 1), has_aux=True)(
            params["head"], out
        )
        carry_bar = carry_cotangent(core, new_carry, out_bar)
        core_bar = estimator.grad(new_trace, params["core"], carry_bar)
        new_trace = estimator.observe(new_trace, params["core"], carry_bar)
        correct = weight * _hit(logits, target)
        grads = {"core": core_bar, "head": head_bar}
        return new_carry, new_trace, loss, correct, grads

    def train_step(state: OnlineTrainState, batch: Stream):
        batch_size = batch.reset.shape[0]
        params = state.params
        key, step_key = jax.random.split(state.key)
        init_keys = jax.random.split(jax.random.fold_in(step_key, 0), batch_size)
        fresh_carry = _broadcast(core.initial_carry(jax.tree.leaves(state.carry)[0].dtype), batch_size)
        fresh_trace = jax.vmap(lambda c, k: estimator.init(params["core"], c, key=k))(fresh_carry, init_keys)
        restarted_trace = jax.vmap(lambda t, c, k: restart_trace(estimator, t, params["core"], c, key=k))(
            state.trace, fresh_carry, init_keys
        )
        carry = _select(batch.reset, fresh_carry, state.carry)
        trace = _select(batch.reset, restarted_trace, state.trace)
        step_keys = jax.random.split(jax.random.fold_in(step_key, 1), batch_size)
        carry, trace, loss, correct, grads = jax.vmap(stream_step, in_axes=(None, 0, 0, 0, 0, 0, 0))(
            params, trace, carry, batch.inputs, batch.targets, batch.mask, step_keys
        )
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        new_params, opt_state, flags = _guarded_update(
            optimizer, nonfinite, params, state.opt_state, grads, loss, carry, trace
        )
        if nonfinite != "ignore":
            everywhere = jnp.broadcast_to(flags == 0, batch.reset.shape)
            carry = _select(everywhere, carry, fresh_carry)
            trace = _select(everywhere, trace, fresh_trace)
        new_state = OnlineTrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=opt_state,
            carry=carry,
            trace=trace,
            key=key,
        )
        return new_state, _step_metrics(loss, batch.mask, correct, grads, flags)

    return train_step


def _hit(out: jax.Array, target: jax.Array) -> jax.Array:
    """Whether the argmax of one stream's output is the target's (or the integer label)."""
    if jnp.issubdtype(jnp.result_type(target), jnp.integer):
        return jnp.argmax(out) == target
    return jnp.argmax(out) == jnp.argmax(target)


def _guarded_update(
    optimizer: optax.GradientTransformation,
    nonfinite: str,
    params: Params,
    opt_state: Any,
    grads: Params,
    loss: jax.Array,
    carry: Any,
    trace: Any,
) -> tuple[Params, Any, jax.Array]:
    """The optimizer's update, kept only when every quantity is finite (unless ``nonfinite="ignore"``).

    Returns:
      ``(params, opt_state, flags)``: the updated (or, after a non-finite step, the given)
      parameters and optimizer state, and the :data:`NONFINITE_FLAGS` of the step (0 when finite).
    """
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    checks = {
        "loss": _all_finite(loss),
        "grad": _all_finite(grads),
        "carry": _all_finite(carry),
        "trace": _all_finite(trace),
        "params": _all_finite(new_params),
    }
    flags = functools.reduce(
        jnp.add, (jnp.where(ok, 0, NONFINITE_FLAGS[name]) for name, ok in checks.items())
    )
    flags = flags.astype(jnp.int32)
    if nonfinite != "ignore":
        new_params, new_opt_state = _select(flags == 0, (new_params, new_opt_state), (params, opt_state))
    return new_params, new_opt_state, flags


def _step_metrics(loss, mask, correct, grads, flags) -> StepMetrics:
    return StepMetrics(
        loss=jnp.sum(loss),
        weight=jnp.sum(mask),
        correct=jnp.sum(correct),
        grad_norm=optax.tree.norm(grads),
        nonfinite=flags,
    )


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite!r}.")


class ModelTrainState(NamedTuple):
    """Everything an online run of a whole Flax model carries from one step to the next (a pytree).

    Attributes:
      step: the number of stream steps taken.
      params: the model's ``"params"`` collection, the trainable parameters.
      opt_state: the optimizer state of ``params``.
      online: the model's other collections (``{"online": ...}``: the carries and traces of its
        :class:`~rtrl_jax.OnlineRNN` layers, leading axis batch).
      restart: ``(batch,)`` booleans: streams whose carries and traces start afresh at the next
        step (set for every stream after a skipped non-finite step).
      key: the random key for the next step.
    """

    step: jax.Array
    params: Params
    opt_state: Any
    online: Any
    restart: jax.Array
    key: jax.Array


MODEL_RNG_STREAMS = ("online", "dropout")
"""The rng streams a whole model's step is applied with (one key each, fresh every step)."""


def init_model_train_state(
    optimizer: optax.GradientTransformation,
    variables: Mapping[str, Any],
    *,
    batch_size: int,
    key: jax.Array,
) -> ModelTrainState:
    """The state at the start of an online run of a whole model.

    Args:
      optimizer: the Optax transformation of the model's parameter gradients.
      variables: the model's variables, e.g. ``model.init(key, x0, reset0)`` for a first input
        ``x0`` of ``batch_size`` streams: ``"params"`` and the collections that hold the carries
        and traces (``"online"``), leading axis ``batch_size``; or an nnx model itself (its
        ``nnx.Param`` state is ``params``, the rest ``online``: :func:`~rtrl_jax.split_model`).
      batch_size: the number of streams.
      key: the random key of the run (the rng streams :data:`MODEL_RNG_STREAMS` of every step).

    Returns:
      A :class:`ModelTrainState` at step 0.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    params, online = split_model(variables)
    return ModelTrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        online=online,
        restart=jnp.zeros((batch_size,), bool),
        key=key,
    )


def _split_online(online: Any) -> tuple[list, list]:
    """The leaves of a model's online collections: ``(carries and other state, traces)``."""
    carry: list[Any] = []
    trace: list[Any] = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(online):
        in_trace = any(getattr(entry, "key", None) == "trace" for entry in path)
        (trace if in_trace else carry).append(leaf)
    return carry, trace


def make_model_train_step(
    model: nn.Module | nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    nonfinite: str = "skip",
) -> Callable[[ModelTrainState, Stream], tuple[ModelTrainState, StepMetrics]]:
    """One online step of a whole Flax model for a batch of streams.

    A linen model is applied as ``model.apply({"params": params, **state.online}, x, reset,
    mutable=[*state.online], rngs=...)``, an nnx model merged from its ``GraphDef``, ``params``
    and ``state.online`` and called (:func:`~rtrl_jax.apply_model`): ``x`` the step's inputs
    ``(batch, ...)`` and ``reset`` ``(batch,)`` booleans, the streams that start an episode at
    this step, which it passes to its online layers. The gradient is ``jax.grad`` of the batch-mean weighted
    step loss ``Σ_b mask_b · loss_fn(out_b, target_b) / B``: each recurrent layer's parameters get
    their estimator's ``c_t · J_t``, everything else its current-step gradient.

    Args:
      model: a linen or nnx module with online recurrent layers (``model(x, reset) -> outputs``),
        applied by :func:`~rtrl_jax.apply_model`.
      optimizer: any Optax transformation of the model's parameter gradients (``optax.MultiSteps``
        to update every ``k`` steps).
      loss_fn: ``(output, target) -> scalar`` loss of one step of one stream: classification,
        regression, integer labels, ...; ``Stream.mask`` weights it (0: no loss at that step).
      nonfinite: the policy for non-finite values, as in :func:`make_train_step`; after a skipped
        step the online collections are kept from before it and every stream restarts at the next.

    Returns:
      ``train_step(state, batch) -> (state, metrics)`` for a :class:`ModelTrainState` and a
      :class:`Stream` slice of one time step (leading axis batch). Pure; jit it or scan it.
    """
    _check_policy(nonfinite)
    definition = model_definition(model)

    def train_step(state: ModelTrainState, batch: Stream):
        batch_size = batch.reset.shape[0]
        key, step_key = jax.random.split(state.key)
        rngs = {name: jax.random.fold_in(step_key, i) for i, name in enumerate(MODEL_RNG_STREAMS)}
        reset = batch.reset | state.restart

        def batch_loss(params):
            out, online = apply_model(definition, params, state.online, batch.inputs, reset, rngs)
            loss = batch.mask * jax.vmap(loss_fn)(out, batch.targets)
            return jnp.sum(loss) / batch_size, (out, online, loss)

        (_, (out, online, loss)), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params)
        correct = batch.mask * jax.vmap(_hit)(out, batch.targets)
        new_params, opt_state, flags = _guarded_update(
            optimizer, nonfinite, state.params, state.opt_state, grads, loss, *_split_online(online)
        )
        restart = jnp.zeros_like(state.restart)
        if nonfinite != "ignore":
            online = _select(flags == 0, online, state.online)
            restart = jnp.broadcast_to(flags != 0, state.restart.shape)
        new_state = ModelTrainState(state.step + 1, new_params, opt_state, online, restart, key)
        return new_state, _step_metrics(loss, batch.mask, correct, grads, flags)

    return train_step


def make_train_chunk(
    core: Core,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    *,
    head: Head | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    nonfinite: str = "skip",
) -> Callable[[OnlineTrainState, Stream], tuple[OnlineTrainState, StepMetrics]]:
    """Many steps of :func:`make_train_step` in one jitted ``jax.lax.scan``.

    Under ``nonfinite="stop"`` the steps after a non-finite one leave the state as it is (so
    ``state.step`` tells where the chunk halted) and report zero metrics.

    The result is cached on its arguments (the core, estimator, optimizer, head and loss function
    are compared by identity), so calling this, or :func:`train_online`, again with the same ones
    returns the same jitted function: same shapes, no new compilation.

    Returns:
      ``train_chunk(state, stream) -> (state, metrics)`` for a stream with axes (batch, time, ...)
      and metrics with a leading time axis.
    """
    options = {"head": head, "loss_fn": loss_fn, "nonfinite": nonfinite}
    return _chunk(make_train_step, (core, estimator, optimizer), options)


def make_model_train_chunk(
    model: nn.Module | nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    nonfinite: str = "skip",
) -> Callable[[ModelTrainState, Stream], tuple[ModelTrainState, StepMetrics]]:
    """Many steps of :func:`make_model_train_step` in one jitted ``jax.lax.scan``, cached as
    :func:`make_train_chunk` (the model compared by value, the optimizer and loss by identity)."""
    options = {"loss_fn": loss_fn, "nonfinite": nonfinite}
    return _chunk(make_model_train_step, (model_definition(model), optimizer), options)


def _chunk(make_step: Callable, arguments: tuple, options: dict[str, Any]) -> Callable:
    """The jitted chunk of ``make_step(*arguments, **options)``, from the cache when hashable."""
    key = (make_step, arguments, tuple(options.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable optimizer or loss: build a fresh chunk
        return _train_chunk(*key)
    return _cached_train_chunk(*key)


def _train_chunk(make_step: Callable, arguments: tuple, options: tuple) -> Callable:
    keywords = dict(options)
    train_step = make_step(*arguments, **keywords)
    stop = keywords["nonfinite"] == "stop"

    def halting_step(carry, batch):
        state, halted = carry

        def skip(state, batch):
            _, metrics = jax.eval_shape(train_step, state, batch)
            return state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

        state, metrics = jax.lax.cond(halted, skip, train_step, state, batch)
        return (state, halted | (metrics.nonfinite != 0)), metrics

    @jax.jit
    def train_chunk(state, stream):
        time_major = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), stream)
        if not stop:
            return jax.lax.scan(train_step, state, time_major)
        (state, _), metrics = jax.lax.scan(halting_step, (state, jnp.array(False)), time_major)
        return state, metrics

    return train_chunk


_cached_train_chunk = functools.lru_cache(maxsize=64)(_train_chunk)


Data = Stream | Source | Iterable
"""What the trainers take: a materialised :class:`Stream` (axes batch, time), a :class:`Source`
drawn chunk by chunk, or an iterable of chunks, each a :class:`Stream` or an
``(inputs, targets, reset[, mask])`` tuple with axes (batch, time, ...)."""


def train_online(
    core: Core,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    stream: Data,
    state: OnlineTrainState,
    *,
    head: Head | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    chunk_size: int = 500,
    callback: Callable[[OnlineTrainState, StepMetrics], None] | None = None,
    nonfinite: str = "skip",
    num_steps: int | None = None,
    keep_metrics: bool = True,
) -> tuple[OnlineTrainState, StepMetrics]:
    """Trains online over ``stream`` from ``state.step`` to its end (or to ``num_steps``).

    The data is consumed in jitted chunks of ``chunk_size`` steps (the last chunk may be shorter);
    ``callback(state, chunk_metrics)`` runs on the host after each chunk (progress bars,
    checkpoints). Starting from a state part-way through (``state.step > 0``) resumes the run: a
    :class:`Stream` or :class:`Source` continues at step ``state.step``; an iterable is read
    from where it stands (it is the caller's to position). With the same ``chunk_size`` and a
    start at a chunk end the result is bitwise that of one long run.

    Args:
      core, estimator, optimizer: what is trained, and how.
      stream: a :class:`Stream` with leading axes (batch, time), a :class:`Source`
        (:func:`~rtrl_jax.task_source`), or an iterable of chunks (:data:`Data`); each chunk of an
        iterable is one jitted call, so chunks of one length compile once.
      state: an :class:`OnlineTrainState` (:func:`init_train_state`).
      head: the readout (default :func:`linear_head`).
      loss_fn: ``(logits, targets) -> scalar`` loss of one step of one stream.
      chunk_size: steps per jitted chunk of a :class:`Stream` or :class:`Source`.
      callback: ``callback(state, chunk_metrics)`` after each chunk.
      nonfinite: the policy for non-finite values (see :func:`make_train_step`).
      num_steps: the step to stop at (default: the end of the stream or source; an unbounded
        source or iterable runs until the iterable ends).
      keep_metrics: return the metrics of every step (memory grows with the steps); ``False``
        returns empty metrics, the callback still seeing every chunk's.

    Returns:
      ``(final state, per-step metrics)`` with metrics as NumPy arrays over the steps taken.

    Raises:
      NonFiniteError: under ``nonfinite="stop"``, after the callback of the chunk with the bad step.
    """
    _check_policy(nonfinite)
    dtype = jnp.result_type(*jax.tree.leaves(state.params))

    def cast(chunk: Stream) -> Stream:
        if chunk.inputs.ndim < 3:
            raise ValueError(
                f"stream inputs must have axes (batch, time, features), got shape {chunk.inputs.shape};"
                " use tasks.sample_batch or tasks.task_source for a batch of streams."
            )
        return chunk._replace(inputs=chunk.inputs.astype(dtype), targets=chunk.targets.astype(dtype))

    _check_head(core, head or _LINEAR_HEAD, state.params)
    train_chunk = make_train_chunk(
        core, estimator, optimizer, head=head, loss_fn=loss_fn, nonfinite=nonfinite
    )
    batch_size = jax.tree.leaves(state.carry)[0].shape[0]
    limits = _Limits(batch_size, chunk_size, num_steps, keep_metrics)
    return _run_chunks(train_chunk, stream, cast, state, limits, callback, nonfinite)


def _check_head(core: Core, head: Head, params: Params) -> None:
    """Raises a ``ValueError`` naming both sizes when the head cannot read the core's output."""
    out = jax.ShapeDtypeStruct(tuple(core.output_shape), jnp.result_type(*jax.tree.leaves(params["core"])))
    try:
        jax.eval_shape(head.apply, params["head"], out)
    except (TypeError, ValueError) as error:
        shapes = jax.tree.map(jnp.shape, params["head"])
        raise ValueError(
            f"the head cannot read the core's output of shape {tuple(core.output_shape)}: head parameters"
            f" {shapes} ({_first_line(error)}); build the head for {core.output_shape[-1]} inputs,"
            " e.g. linear_head().init(key, core.output_shape[-1], num_classes)."
        ) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def train_model_online(
    model: nn.Module | nnx.Module,
    optimizer: optax.GradientTransformation,
    stream: Data,
    state: ModelTrainState,
    *,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    chunk_size: int = 500,
    callback: Callable[[ModelTrainState, StepMetrics], None] | None = None,
    nonfinite: str = "skip",
    num_steps: int | None = None,
    keep_metrics: bool = True,
) -> tuple[ModelTrainState, StepMetrics]:
    """Trains a whole Flax model online over ``stream``, as :func:`train_online`.

    Chunks, data (a :class:`Stream`, a :class:`Source` or an iterable of chunks), callbacks,
    resuming from ``state.step`` and the non-finite policy are those of :func:`train_online`; each
    step is :func:`make_model_train_step`. Floating inputs and targets are cast to the parameters'
    dtype; integer ones (tokens for ``nn.Embed``, labels) are kept.

    Args:
      model: a linen or nnx module ``model(x, reset) -> outputs`` with online recurrent layers
        (an nnx model is left as it is: ``nnx.update(model, state.params, state.online)`` puts
        the trained state into it).
      optimizer: the Optax transformation the state was made with.
      stream: the data (:data:`Data`), leading axes (batch, time).
      state: a :class:`ModelTrainState` (:func:`init_model_train_state`).
      loss_fn: ``(output, target) -> scalar`` loss of one step of one stream.
      chunk_size: steps per jitted chunk.
      callback: ``callback(state, chunk_metrics)`` after each chunk.
      nonfinite: the policy for non-finite values.
      num_steps: the step to stop at (default: the end of the data).
      keep_metrics: return the metrics of every step (``False``: empty metrics).

    Returns:
      ``(final state, per-step metrics)`` with metrics as NumPy arrays over the steps taken.

    Raises:
      NonFiniteError: under ``nonfinite="stop"``, after the callback of the chunk with the bad step.

    Example::

        variables = model.init(key, stream.inputs[:, 0], stream.reset[:, 0])
        state = init_model_train_state(tx, variables, batch_size=4, key=key)
        state, metrics = train_model_online(model, tx, stream, state)
    """
    _check_policy(nonfinite)
    dtype = jnp.result_type(*jax.tree.leaves(state.params))

    def cast(chunk: Stream) -> Stream:
        if chunk.reset.ndim != 2:
            raise ValueError(
                f"stream resets must have axes (batch, time), got shape {chunk.reset.shape};"
                " use tasks.sample_batch or tasks.task_source for a batch of streams."
            )
        floating = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a  # noqa: E731
        return chunk._replace(inputs=floating(chunk.inputs), targets=floating(chunk.targets))

    train_chunk = make_model_train_chunk(model, optimizer, loss_fn=loss_fn, nonfinite=nonfinite)
    limits = _Limits(state.restart.shape[0], chunk_size, num_steps, keep_metrics)
    return _run_chunks(train_chunk, stream, cast, state, limits, callback, nonfinite)


class _Limits(NamedTuple):
    batch_size: int
    chunk_size: int
    num_steps: int | None
    keep_metrics: bool


def as_stream(chunk: Any) -> Stream:
    """A chunk of data as a :class:`Stream`: a ``Stream``, or ``(inputs, targets, reset[, mask])``.

    A missing ``mask`` weights every step 1.

    Raises:
      ValueError: anything else (the message names what was given).
    """
    if isinstance(chunk, Stream):
        return chunk
    if isinstance(chunk, tuple | list) and len(chunk) in (3, 4):
        inputs, targets, reset = (jnp.asarray(a) for a in chunk[:3])
        mask = jnp.asarray(chunk[3]) if len(chunk) == 4 else jnp.ones(reset.shape, jnp.float32)
        return Stream(inputs, targets, mask, reset.astype(bool))
    raise ValueError(
        "a chunk of data must be a Stream or an (inputs, targets, reset[, mask]) tuple with axes"
        f" (batch, time, ...), got {type(chunk).__name__}"
        + (f" of length {len(chunk)}" if isinstance(chunk, tuple | list) else "")
        + "."
    )


def _chunks(data: Data, start: int, limits: _Limits) -> Iterator[Stream]:
    """The chunks of ``data`` from step ``start`` on (a stream's or source's end, or ``num_steps``)."""
    chunk_size, num_steps = limits.chunk_size, limits.num_steps
    if isinstance(data, Stream) and data.reset.ndim < 2:
        yield data  # not a batch: the trainer's check names the shape
        return
    if isinstance(data, Stream | Source):
        length = data.reset.shape[1] if isinstance(data, Stream) else data.num_steps
        if length is not None and length == 0:
            raise ValueError("the stream is empty (0 steps).")
        end = length if num_steps is None else num_steps if length is None else min(num_steps, length)
        if end is None:
            raise ValueError("the source is unbounded: give num_steps, the step to stop at.")
        if start > end:
            raise ValueError(f"the state is at step {start}, past the end of the {end}-step stream.")
        for begin in range(start, end, chunk_size):
            stop = min(begin + chunk_size, end)
            if isinstance(data, Stream):
                yield jax.tree.map(lambda a, b=begin, e=stop: a[:, b:e], data)
            else:
                yield data.chunk(begin, stop - begin)
        return
    if not isinstance(data, Iterable):
        raise ValueError(
            f"the data must be a Stream, a Source or an iterable of chunks, got {type(data).__name__}."
        )
    step = start
    for item in data:
        if num_steps is not None and step >= num_steps:
            return
        chunk = as_stream(item)
        if num_steps is not None and step + chunk.reset.shape[1] > num_steps:
            chunk = jax.tree.map(lambda a, n=num_steps - step: a[:, :n], chunk)
        step += chunk.reset.shape[1]
        yield chunk


def _run_chunks(train_chunk, data, cast, state, limits: _Limits, callback, nonfinite):
    """Runs ``train_chunk`` over the chunks of ``data`` from ``state.step``."""
    chunk_size, batch_size = limits.chunk_size, limits.batch_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    collected = []
    for chunk in _chunks(data, int(state.step), limits):
        chunk = cast(chunk)
        if chunk.reset.shape[0] != batch_size:
            raise ValueError(
                f"the stream has {chunk.reset.shape[0]} streams but the state holds {batch_size}."
            )
        begin = int(state.step)
        state, metrics = train_chunk(state, chunk)
        taken = int(state.step) - begin
        metrics = StepMetrics(*(np.asarray(m)[:taken] for m in metrics))
        if limits.keep_metrics:
            collected.append(metrics)
        if callback is not None:
            callback(state, metrics)
        if nonfinite == "stop" and taken and metrics.nonfinite[-1] != 0:
            everything = _concatenate(collected)
            raise NonFiniteError(
                int(state.step), nonfinite_names(int(metrics.nonfinite[-1])), state=state, metrics=everything
            )
    return state, _concatenate(collected)


def _concatenate(collected: list[StepMetrics]) -> StepMetrics:
    if not collected:
        empty = np.zeros((0,), np.float32)
        return StepMetrics(empty, empty, empty, empty, np.zeros((0,), np.int32))
    return StepMetrics(*(np.concatenate(parts) for parts in zip(*collected, strict=True)))
