"""Online training: one step of the core, the trace and an Optax update per stream step.

At every step ``t`` of a batch of independent streams the trainer

1. resets the carry and the trace of the streams whose episode starts at ``t``;
2. advances core and trace with ``estimator.step``;
3. computes the step loss through the readout head (ordinary autodiff for the head);
4. gets the recurrent gradient from the estimator (``online_grad``), averages over the batch, and
5. applies any ``optax.GradientTransformation`` (every step, or every ``k`` steps through
   ``optax.MultiSteps``).

Everything a run needs between steps is the :class:`OnlineTrainState` pytree, so a whole run is one
``jax.lax.scan`` and can be stopped and resumed between chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtrl_jax._src.base import Estimator, Params
from rtrl_jax._src.cores import Core
from rtrl_jax._src.online import online_grad
from rtrl_jax._src.tasks import Stream


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
    """

    loss: jax.Array
    weight: jax.Array
    correct: jax.Array
    grad_norm: jax.Array


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
) -> Callable[[OnlineTrainState, Stream], tuple[OnlineTrainState, StepMetrics]]:
    """One online step for a batch of streams.

    Args:
      core: the recurrent core.
      estimator: an estimator built for ``core``.
      optimizer: any Optax transformation of ``{"core": ..., "head": ...}`` gradients; wrap it in
        ``optax.MultiSteps`` to update every ``k`` steps.
      head: the readout (default :func:`linear_head`).
      loss_fn: ``(logits, targets) -> scalar`` loss of one step of one stream.

    Returns:
      ``train_step(state, batch) -> (state, metrics)`` where ``batch`` is a :class:`Stream` slice
      for one time step (leading axis batch). Pure; jit it or scan it.
    """
    head = head or linear_head()

    def stream_step(params, trace, carry, x, target, weight, key):
        new_carry, out, new_trace = estimator.step(trace, params["core"], carry, x, key=key)

        def step_loss(head_params, out):
            logits = head.apply(head_params, out)
            return weight * loss_fn(logits, target), logits

        (loss, logits), (head_bar, out_bar) = jax.value_and_grad(step_loss, argnums=(0, 1), has_aux=True)(
            params["head"], out
        )
        core_bar = online_grad(core, estimator, new_trace, params["core"], new_carry, out_bar)
        correct = weight * (jnp.argmax(logits) == jnp.argmax(target))
        grads = {"core": core_bar, "head": head_bar}
        return new_carry, new_trace, loss, correct, grads

    def train_step(state: OnlineTrainState, batch: Stream):
        batch_size = batch.reset.shape[0]
        params = state.params
        key, step_key = jax.random.split(state.key)
        init_keys = jax.random.split(jax.random.fold_in(step_key, 0), batch_size)
        fresh_carry = _broadcast(core.initial_carry(jax.tree.leaves(state.carry)[0].dtype), batch_size)
        fresh_trace = jax.vmap(lambda c, k: estimator.init(params["core"], c, key=k))(fresh_carry, init_keys)
        carry = _select(batch.reset, fresh_carry, state.carry)
        trace = _select(batch.reset, fresh_trace, state.trace)
        step_keys = jax.random.split(jax.random.fold_in(step_key, 1), batch_size)
        carry, trace, loss, correct, grads = jax.vmap(stream_step, in_axes=(None, 0, 0, 0, 0, 0, 0))(
            params, trace, carry, batch.inputs, batch.targets, batch.mask, step_keys
        )
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new_state = OnlineTrainState(
            step=state.step + 1,
            params=optax.apply_updates(params, updates),
            opt_state=opt_state,
            carry=carry,
            trace=trace,
            key=key,
        )
        metrics = StepMetrics(
            loss=jnp.sum(loss),
            weight=jnp.sum(batch.mask),
            correct=jnp.sum(correct),
            grad_norm=optax.global_norm(grads),
        )
        return new_state, metrics

    return train_step


def make_train_chunk(
    train_step: Callable[[OnlineTrainState, Stream], tuple[OnlineTrainState, StepMetrics]],
) -> Callable[[OnlineTrainState, Stream], tuple[OnlineTrainState, StepMetrics]]:
    """Many steps in one jitted ``jax.lax.scan``.

    Returns:
      ``train_chunk(state, stream) -> (state, metrics)`` for a stream with axes (batch, time, ...)
      and metrics with a leading time axis.
    """

    @jax.jit
    def train_chunk(state, stream):
        time_major = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), stream)
        return jax.lax.scan(train_step, state, time_major)

    return train_chunk


def train_online(
    core: Core,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    stream: Stream,
    state: OnlineTrainState,
    *,
    head: Head | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    chunk_size: int = 500,
    callback: Callable[[OnlineTrainState, StepMetrics], None] | None = None,
) -> tuple[OnlineTrainState, StepMetrics]:
    """Trains online over ``stream`` (leading axes batch, time), from ``state.step`` to its end.

    The stream is consumed in jitted chunks of ``chunk_size`` steps (the last chunk may be shorter);
    ``callback(state, chunk_metrics)`` runs on the host after each chunk (progress bars,
    checkpoints). Starting from a state part-way through (``state.step > 0``) resumes the run.

    Returns:
      ``(final state, per-step metrics)`` with metrics as NumPy arrays over the steps taken.
    """
    if stream.inputs.ndim < 3:
        raise ValueError(
            f"stream inputs must have axes (batch, time, features), got shape {stream.inputs.shape};"
            " use tasks.sample_batch for a batch of streams."
        )
    num_steps = stream.inputs.shape[1]
    if num_steps == 0:
        raise ValueError("the stream is empty (0 steps).")
    if stream.inputs.shape[0] != jax.tree.leaves(state.carry)[0].shape[0]:
        raise ValueError(
            f"the stream has {stream.inputs.shape[0]} streams but the state holds"
            f" {jax.tree.leaves(state.carry)[0].shape[0]}."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    dtype = jnp.result_type(*jax.tree.leaves(state.params))
    stream = stream._replace(inputs=stream.inputs.astype(dtype), targets=stream.targets.astype(dtype))
    train_chunk = make_train_chunk(make_train_step(core, estimator, optimizer, head=head, loss_fn=loss_fn))
    collected = []
    start = int(state.step)
    for begin in range(start, num_steps, chunk_size):
        end = min(begin + chunk_size, num_steps)
        chunk = jax.tree.map(lambda a, b=begin, e=end: a[:, b:e], stream)
        state, metrics = train_chunk(state, chunk)
        metrics = StepMetrics(*(np.asarray(m) for m in metrics))
        collected.append(metrics)
        if callback is not None:
            callback(state, metrics)
    if not collected:
        empty = np.zeros((0,), np.float32)
        return state, StepMetrics(empty, empty, empty, empty)
    return state, StepMetrics(*(np.concatenate(parts) for parts in zip(*collected, strict=True)))
