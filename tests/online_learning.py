"""Shared by the tests: per-step online gradients of a step loss, and an online run on the add task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rtrl_jax

# The test programs are compiled once each and run on a few small steps: XLA's backend optimisation
# would cost more compile time than it saves.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def jit(fn, **kwargs):
    """``jax.jit`` with the tests' :data:`COMPILER_OPTIONS`."""
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)


def online_grads(core, estimator, params, carry, xs, weights, step_loss):
    """Per-step online gradients of ``step_loss(out_t, weights_t)`` (leading axis time), jitted."""

    def body(state, inputs):
        trace, h = state
        x, w = inputs
        h, out, trace = estimator.step(trace, params, h, x)
        out_bar = jax.grad(step_loss)(out, w)
        return (trace, h), rtrl_jax.online_grad(core, estimator, trace, params, h, out_bar)

    run = jit(lambda: jax.lax.scan(body, (estimator.init(params, carry), carry), (xs, weights))[1])
    return run()


def rollout(core, estimator, params, carry, xs):
    """``(carry, trace, influence)`` after running ``estimator`` over ``xs`` (jitted scan)."""

    @jit
    def go(params, carry, xs):
        def body(state, x):
            carry, trace = state
            carry, _, trace = estimator.step(trace, params, carry, x)
            return (carry, trace), None

        return jax.lax.scan(body, (carry, estimator.init(params, carry)), xs)[0]

    carry, trace = go(params, carry, xs)
    return carry, trace, rtrl_jax.influence_matrix(estimator, trace, params, carry)


def frozen(core):
    """An estimator without a trace whose gradient is zero: the core stays as initialised."""
    return rtrl_jax.Estimator(
        init=lambda params, carry, *, key=None: (),
        step=lambda trace, params, carry, x, *, key=None: (*core(params, carry, x), ()),
        grad=lambda trace, params, carry_bar: jax.tree.map(jnp.zeros_like, params),
    )


def add_task_loss(core, estimator, *, readout_only=False, steps=3000, batch=16, seed=0):
    """Mean step loss over the last fifth of an online run on the add task (t1=5, t2=9).

    ``readout_only``: only the head learns, the core stays as initialised. That loss does not
    depend on the estimator (the core's gradients are dropped), so it is computed once per core
    configuration with :func:`frozen` and shared by the tests."""
    if readout_only:
        key = (repr(core.module), core.input_shape, steps, batch, seed, jax.config.jax_enable_x64)
        return _readout_only_loss(key, core, steps, batch, seed)
    return _add_task_loss(core, estimator, False, steps, batch, seed)


_READOUT_ONLY = {}


def _readout_only_loss(key, core, steps, batch, seed):
    if key not in _READOUT_ONLY:
        _READOUT_ONLY[key] = _add_task_loss(core, frozen(core), True, steps, batch, seed)
    return _READOUT_ONLY[key]


def _add_task_loss(core, estimator, readout_only, steps, batch, seed):
    params, _ = core.init(jax.random.PRNGKey(seed))
    head = rtrl_jax.linear_head()
    head_params = head.init(jax.random.PRNGKey(seed + 1), core.output(core.initial_carry()).shape[0], 2)
    optimizer = optax.adam(3e-3)
    if readout_only:
        optimizer = optax.multi_transform(
            {"core": optax.set_to_zero(), "head": optax.adam(3e-3)}, {"core": "core", "head": "head"}
        )
    state = rtrl_jax.init_train_state(
        core, estimator, optimizer, params, head_params, batch_size=batch, key=jax.random.PRNGKey(2)
    )
    stream = rtrl_jax.sample_batch(rtrl_jax.add_task(5, 9), jax.random.PRNGKey(seed + 3), steps, batch)
    _, metrics = rtrl_jax.train_online(core, estimator, optimizer, stream, state, chunk_size=steps)
    loss = metrics.loss / metrics.weight
    return float(np.mean(loss[-steps // 5 :]))


def episodes(steps: int, starts: list[list[int]]) -> jax.Array:
    """``(batch, steps)`` reset flags: stream ``b`` starts an episode at each step of ``starts[b]``."""
    flags = np.zeros((len(starts), steps), bool)
    for b, stream_starts in enumerate(starts):
        flags[b, stream_starts] = True
    return jnp.asarray(flags)


def trainer_traces_by_hand(core, estimator, params, head_params, stream, key, kept):
    """The traces :func:`rtrl_jax.train_online` ends with at learning rate 0 (linear head, softmax
    cross-entropy), computed by a hand-written loop: each step restarts the streams whose episode
    starts (carry: the core's initial carry; trace: ``init``'s, except the fields named in ``kept``,
    carried over from the trace before), then ``step``, and ``observe`` of the step loss's carry
    cotangent. The random keys follow the trainer's schedule (:func:`rtrl_jax.init_train_state`,
    ``make_train_step``)."""
    head = rtrl_jax.linear_head()
    batch, steps = stream.reset.shape
    carry0 = core.initial_carry(jax.tree.leaves(params)[0].dtype)

    def restart(trace, init_key):
        fresh = estimator.init(params, carry0, key=init_key)
        return fresh._replace(**{name: getattr(trace, name) for name in kept})

    def one(trace, carry, x, target, reset, init_key, step_key):
        trace = jax.tree.map(lambda a, b: jnp.where(reset, a, b), restart(trace, init_key), trace)
        carry = jax.tree.map(lambda a, b: jnp.where(reset, a, b), carry0, carry)
        carry, out, trace = estimator.step(trace, params, carry, x, key=step_key)
        out_bar = jax.grad(lambda o: rtrl_jax.softmax_cross_entropy(head.apply(head_params, o), target))(out)
        return estimator.observe(trace, params, rtrl_jax.carry_cotangent(core, carry, out_bar)), carry

    def body(state, t):
        traces, carries, key = state
        key, step_key = jax.random.split(key)
        init_keys = jax.random.split(jax.random.fold_in(step_key, 0), batch)
        step_keys = jax.random.split(jax.random.fold_in(step_key, 1), batch)
        at_t = (stream.inputs[:, t], stream.targets[:, t], stream.reset[:, t])
        traces, carries = jax.vmap(one)(traces, carries, *at_t, init_keys, step_keys)
        return (traces, carries, key), None

    @jit
    def run():
        trace_keys = jax.random.split(jax.random.fold_in(key, 1), batch)
        traces = jax.vmap(lambda k: estimator.init(params, carry0, key=k))(trace_keys)
        carries = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), carry0)
        state = (traces, carries, jax.random.fold_in(key, 2))
        return jax.lax.scan(body, state, jnp.arange(steps))[0][0]

    return run()


def check_trainer_keeps_learned_parts(core, estimator, kept, steps=12, starts=((0, 4, 8), (0, 6))):
    """The trainer over several episodes (learning rate 0, float64) ends with the traces of
    :func:`trainer_traces_by_hand` restarting all but ``kept`` (to ``1e-10``), and the fields in
    ``kept`` differ from a run restarting the whole trace at every episode start (so the episode
    boundaries matter) and from ``init``'s (so they have learned)."""
    params, _ = core.init(jax.random.PRNGKey(0), jnp.float64)
    head = rtrl_jax.linear_head()
    head_params = head.init(jax.random.PRNGKey(1), core.output_shape[-1], 2, jnp.float64)
    batch = len(starts)
    stream = rtrl_jax.Stream(
        inputs=jax.random.normal(jax.random.PRNGKey(2), (batch, steps, *core.input_shape), jnp.float64),
        targets=jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(3), (batch, steps), 0, 2), 2),
        mask=jnp.ones((batch, steps)),
        reset=episodes(steps, starts),
    )
    key = jax.random.PRNGKey(4)
    optimizer = optax.sgd(0.0)
    state = rtrl_jax.init_train_state(
        core, estimator, optimizer, params, head_params, batch_size=batch, key=key
    )
    state, _ = rtrl_jax.train_online(core, estimator, optimizer, stream, state, chunk_size=steps)
    by_hand = trainer_traces_by_hand(core, estimator, params, head_params, stream, key, kept)
    for got, want in zip(jax.tree.leaves(state.trace), jax.tree.leaves(by_hand), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    restarted = trainer_traces_by_hand(core, estimator, params, head_params, stream, key, ())
    fresh = estimator.init(params, core.initial_carry(jnp.float64))
    for name in kept:
        learned = np.asarray(getattr(by_hand, name))
        assert np.abs(learned - np.asarray(getattr(restarted, name))).max() > 1e-6, name
        assert np.abs(learned - np.asarray(getattr(fresh, name))).max() > 1e-6, name
