"""The conformance checks every registered estimator is held to (shared by the tests).

One case is an estimator (a registry entry and options), a shipped cell and a dtype. Everything the
checks need is computed once per case by :func:`compute`: two compiled programs (the run of one
stream, called once per stream, and the same run under ``jax.vmap`` over the streams), plus per cell
one BPTT reference (float64). Compilation is nearly all of the cost, so the programs are small
(``STEPS`` steps, 3-4 units, input 2) and compiled with XLA's backend optimisation off. Each
``check_*`` function asserts one property of the result:

- :func:`check_shapes_and_dtypes`: the trace's floating leaves are in the run's dtype (after
  ``init`` and after every ``step``), carry and output are the core's, the gradient has the
  parameters' structure, shapes and dtypes; everything is finite;
- :func:`check_jit_does_not_recompile`: ``jax.jit(step)`` is not traced again for the trace, carry
  and key that ``step`` returned and a new input (their shapes, dtypes and weak types are the
  ones it was traced for), and the jitted run of a stream is not traced again for other streams;
- :func:`check_vmap_equals_loop`: ``jax.vmap`` over a batch of streams equals the per-stream loop;
- :func:`check_drop_in`: the ``custom_vjp`` drop-in (:func:`rtrl_jax.online_step`) under
  ``jax.grad`` of an unchanged step loss gives the gradients of :func:`rtrl_jax.online_grad`;
- :func:`check_key`: a key is required exactly when ``info.needs_key`` says so: without one
  ``init``/``step`` raise a ``ValueError`` naming ``key``; a deterministic estimator runs with
  ``key=None`` and ignores a key it is given (bitwise the same results for another key);
- :func:`check_restart`: ``restart_trace`` (the trace at an episode start) of the run's last trace
  has ``init``'s structure, shapes and dtypes; restarting a fresh trace gives ``init``'s trace; an
  estimator without ``Estimator.restart`` (no learned parts) restarts any trace to ``init``'s;
- :func:`check_exactness` (float64): the per-step gradient is within ``1e-10`` relative error of
  BPTT (``jax.grad`` through ``lax.scan`` of that step's loss) at EVERY step when
  ``info.exact_for(core, **options)``, and is more than ``1e-6`` off at some step otherwise (the
  trajectory is longer than TBPTT's default window of 10).

A test file that registers its own estimator runs them all in a few lines::

    info = rtrl_jax.register("zero", zero, summary="...")
    for cell in conformance.cells_served(info):
        for dtype in conformance.DTYPES:
            conformance.check_all(conformance.compute(info, cell, dtype))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import rtrl_jax

INPUT = 2
STEPS = 14  # longer than TBPTT's default window (10), so that it cannot be exact here
BATCH = 2
DTYPES = ("float32", "float64")

EXACT = 1e-10  # per-step relative error against BPTT where the registry says exact (float64)
NOT_EXACT = 1e-6  # the largest per-step relative error must exceed this where it says not exact
# Two computations of the same quantity (vmap against the loop, the drop-in against online_grad,
# jit(step) against the steps in lax.scan): largest per-step relative error.
# float64: about 5000 ulps; float32: about 1000 ulps (UORO's gradient (c·s̃) θ̃ loses digits to
# cancellation in the dot product c·s̃).
SAME = {"float64": 1e-12, "float32": 1e-4}

# The shipped cells, small: Flax linen cells and the library's cells. ``DEFAULT_CELLS``, the cells of
# the default run, with their dtype there (``DEFAULT_DTYPES``): a dense Flax cell (several Dense
# kernels reading the carry) in float32, the path users run, and an element-wise library cell with a
# pytree carry (``(c, h)``; SnAp-1 is exact on it) in float64, where exactness is checked both ways.
# The rest of the product runs under -m slow.
CELLS: dict[str, Callable[[], nn.RNNCellBase]] = {
    "simple": lambda: nn.SimpleCell(3),
    "gru": lambda: nn.GRUCell(3),
    "lstm": lambda: nn.LSTMCell(3),
    "optimized_lstm": lambda: nn.OptimizedLSTMCell(3),
    "mgu": lambda: nn.MGUCell(3),
    "lru": lambda: rtrl_jax.LRUCell(2),
    "lru_real": lambda: rtrl_jax.LRUCell(2, complex_state=False),
    "elstm": lambda: rtrl_jax.ELSTMCell(3),
    "leaky": lambda: rtrl_jax.LeakyRNNCell(3, tau=3.0),
    "sparse_rnn": lambda: rtrl_jax.SparseRNNCell(4, density=0.5),
    "sparse_gru": lambda: rtrl_jax.SparseGRUCell(4, density=0.5),
    # spiking cells: sized so that some neuron is inside the pseudo-derivative's support at every
    # step of the problem (else BPTT's per-step gradient is exactly 0 there)
    "lif": lambda: rtrl_jax.LIFCell(4),
    "alif": lambda: rtrl_jax.ALIFCell(4, threshold=1.5, beta=0.5, refractory=1),
}
DEFAULT_CELLS = ("gru", "elstm")
DEFAULT_DTYPES = {"gru": ("float32",), "elstm": ("float64",)}


@functools.cache
def core_of(cell: str) -> rtrl_jax.Core:
    """The core of the shipped cell ``cell`` (one per session, so its estimators share analyses)."""
    return rtrl_jax.from_linen(CELLS[cell](), INPUT, name=cell)


def cells_served(info: rtrl_jax.EstimatorInfo, cells=tuple(CELLS)) -> list[str]:
    """The names of the shipped cells that the estimator ``info`` serves."""
    return [cell for cell in cells if info.unsupported_reason(core_of(cell)) is None]


class Problem(NamedTuple):
    """``BATCH`` streams for one core: parameters, initial carries, inputs, step-loss weights and
    keys (leading axis the stream)."""

    params: Any
    carries: Any
    xs: jax.Array
    weights: jax.Array
    keys: jax.Array


def step_loss(out, w):
    """The per-step loss ``L_t``: nonlinear in the output, so its cotangent depends on it."""
    return jnp.sum(jnp.sin(out) * w)


def make_problem(core: rtrl_jax.Core, dtype: str, seed: int = 0) -> Problem:
    """Random parameters, random non-zero initial carries (so that how the carry enters matters),
    inputs, weights and keys for ``BATCH`` streams. Call inside the dtype's x64 context."""
    dtype = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    params, _ = core.init(keys[0], dtype)
    carries = jax.tree.map(
        lambda s, k: 0.5 * jax.random.normal(k, (BATCH, *s.shape), dtype),
        core.carry_spec,
        _split_like(keys[1], core.carry_spec),
    )
    xs = jax.random.normal(keys[2], (BATCH, STEPS, *core.input_shape), dtype)
    weights = jax.random.normal(keys[3], (BATCH, STEPS, *core.output_shape), dtype)
    return Problem(params, carries, xs, weights, jax.random.split(keys[4], BATCH))


@functools.cache
def problem_of(cell: str, dtype: str) -> Problem:
    """The problem of ``cell`` in ``dtype`` (one per session, shared by the estimators)."""
    with jax.enable_x64(dtype == "float64"):
        return make_problem(core_of(cell), dtype)


def _split_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


def _stream(problem: Problem, b: int):
    return jax.tree.map(lambda a: a[b], (problem.carries, problem.xs, problem.weights, problem.keys))


def stream_keys(key, steps: int = STEPS):
    """``(init key, step keys)`` of a stream's ``key``, or ``(None, None)`` without one."""
    if key is None:
        return None, None
    init_key, steps_key = jax.random.split(key)
    return init_key, jax.random.split(steps_key, steps)


def trajectory(core, estimator: rtrl_jax.Estimator, params, carry, xs, weights, key) -> dict:
    """One stream, ``STEPS`` steps with fixed parameters (in ``lax.scan``), each step through the
    ``custom_vjp`` drop-in (:func:`rtrl_jax.online_step`, whose forward is ``estimator.step``)
    under ``jax.grad`` of the user's unchanged step loss, and :func:`rtrl_jax.online_grad` of the
    same step; the trace then observes the step's cotangent (``estimator.observe``) before the
    next step, as in training. ``key`` may be ``None`` (deterministic estimators); see
    :func:`stream_keys`.

    Returns:
      ``{"init_trace", "carry", "out", "trace", "grad", "drop_in"}``, all but the first per step
      (leading axis time; ``grad`` from ``online_grad``, ``drop_in`` from the drop-in).
    """
    init_key, step_keys = stream_keys(key, xs.shape[0])
    trace = estimator.init(params, carry, key=init_key)
    drop_in_step = rtrl_jax.online_step(core, estimator)

    def user_loss(p, trace, h, x, w, k):  # a user's one-step loss
        h, out, trace = drop_in_step(p, trace, h, x, k)
        return step_loss(out, w), (h, out, trace)

    def body(state, inputs):
        x, w, k = inputs
        drop_in, (h, out, trace) = jax.grad(user_loss, has_aux=True)(params, *state, x, w, k)
        out_bar = jax.grad(step_loss)(out, w)
        grad = rtrl_jax.online_grad(core, estimator, trace, params, h, out_bar)
        observed = estimator.observe(trace, params, rtrl_jax.carry_cotangent(core, h, out_bar))
        return (observed, h), {"carry": h, "out": out, "trace": trace, "grad": grad, "drop_in": drop_in}

    _, per_step = jax.lax.scan(body, (trace, carry), (xs, weights, step_keys))
    return {"init_trace": trace, **per_step}


# The conformance programs are tiny and compiled once each: XLA's backend optimisation would cost
# more than it saves (about half of the compile time).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)


@functools.cache
def bptt_step_grads(cell: str):
    """Per-step BPTT gradients ``∇_θ L_t`` (leading axis time) of stream 0 of ``cell``'s float64
    problem: row ``t`` of the Jacobian of the per-step losses, i.e. ``jax.grad`` of ``L_t`` alone
    through ``lax.scan``."""
    core = core_of(cell)

    def per_step_losses(params, carry, xs, weights):
        _, outs = jax.lax.scan(lambda h, x: core(params, h, x), carry, xs)
        return jax.vmap(step_loss)(outs, weights)

    with jax.enable_x64(True):
        problem = problem_of(cell, "float64")
        carry, xs, weights, _ = _stream(problem, 0)
        return jax.device_get(_jit(jax.jacrev(per_step_losses))(problem.params, carry, xs, weights))


class Result(NamedTuple):
    """What :func:`compute` found for one case (host arrays; the checks only read them)."""

    name: str
    cell: str
    dtype: str
    options: Mapping[str, Any]
    needs_key: bool
    exact: bool
    core: Any
    params: Any
    carries: Any
    init_trace_shape: Any
    loop: list  # per stream: trajectory() of that stream (one jitted program called per stream)
    batched: dict  # trajectory() under jax.vmap over the streams, with keys
    run_traces: int  # how many times the jitted trajectory was traced for the BATCH streams
    step_traces: int  # how many times jax.jit(step) was traced for steps 0 and 1
    keyless_errors: dict  # {"init"/"step": error message or None} without a key
    has_restart: bool  # whether the estimator has its own Estimator.restart (learned parts)
    restarted: Any  # restart_trace of stream 0's last trace, with the key its init got
    restarted_fresh: Any  # restart_trace of stream 0's init trace, the same way
    bptt: Any  # per-step BPTT gradients of stream 0 (float64), else None


def compute(
    info: rtrl_jax.EstimatorInfo, cell: str, dtype: str, options: Mapping[str, Any] | None = None
) -> Result:
    """Everything the checks need for ``info`` (with ``options``, default its ``example_options``)
    on the shipped ``cell`` in ``dtype``, computed in that dtype's x64 mode."""
    options = dict(info.example_options if options is None else options)
    with jax.enable_x64(dtype == "float64"):
        return _compute(info, cell, dtype, options)


def _compute(info, cell, dtype, options) -> Result:
    core = core_of(cell)
    estimator = rtrl_jax.make_estimator(info.name, core, **options)
    problem = problem_of(cell, dtype)
    params = problem.params
    keys = problem.keys if info.needs_key else [None] * BATCH

    run = functools.partial(trajectory, core, estimator)
    single = _jit(_counting(run, run_traces := []))
    # the per-stream loop: one compiled program called for each stream (new values each time); a
    # deterministic estimator runs without a key
    loop = [jax.device_get(single(params, *_stream(problem, b)[:3], keys[b])) for b in range(BATCH)]
    # the vmapped run, with keys for every estimator
    batched = jax.device_get(_jit(jax.vmap(run, (None, 0, 0, 0, 0)))(params, *_problem_streams(problem)))

    # jax.jit(step) again for the trace and carry that step returns and a new input and key: the
    # avals (shape, dtype, weak type) and structures decide whether it is traced again
    carry0, xs0, _, key0 = _stream(problem, 0)
    init_key, step_keys = stream_keys(key0) if info.needs_key else (None, [None] * STEPS)
    trace0 = jax.eval_shape(functools.partial(estimator.init, key=init_key), params, carry0)
    step = jax.jit(_counting(estimator.step, step_traces := []))
    step.lower(trace0, params, carry0, xs0[0], key=step_keys[0])
    carry1, _, trace1 = jax.eval_shape(
        functools.partial(estimator.step, key=step_keys[0]), trace0, params, carry0, xs0[0]
    )
    step.lower(trace1, params, carry1, xs0[1], key=step_keys[1])

    keyless_errors = {}
    for fn, args in (("init", (params, carry0)), ("step", (trace0, params, carry0, xs0[0]))):
        try:
            jax.eval_shape(getattr(estimator, fn), *args)
            keyless_errors[fn] = None
        except ValueError as error:
            keyless_errors[fn] = str(error)

    # restarts (eager: a few small ops) of stream 0's last and first traces, from its first carry
    restart = functools.partial(rtrl_jax.restart_trace, estimator, params=params, carry=carry0, key=init_key)
    restarted = jax.device_get(restart(_at(loop[0]["trace"], STEPS - 1)))
    restarted_fresh = jax.device_get(restart(loop[0]["init_trace"]))

    return Result(
        name=info.name,
        cell=cell,
        dtype=dtype,
        options=options,
        needs_key=info.needs_key,
        exact=bool(info.exact_for(core, **options)),
        core=core,
        params=jax.device_get(params),
        carries=jax.device_get(problem.carries),
        init_trace_shape=trace0,
        loop=loop,
        batched=batched,
        run_traces=len(run_traces),
        step_traces=len(step_traces),
        keyless_errors=keyless_errors,
        has_restart=estimator.restart is not None,
        restarted=restarted,
        restarted_fresh=restarted_fresh,
        bptt=bptt_step_grads(cell) if dtype == "float64" else None,
    )


def _counting(fn, traces: list):
    """``fn``, appending to ``traces`` each time it runs: under ``jax.jit``, once per tracing."""

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        traces.append(None)
        return fn(*args, **kwargs)

    return counted


def _problem_streams(problem: Problem):
    return problem.carries, problem.xs, problem.weights, problem.keys


# ---------------------------------------------------------------------------------------------
# The checks.


def _at(tree, *index):
    return jax.tree.map(lambda a: a[index], tree)


def relative_error(a, b) -> float:
    """``‖a - b‖ / ‖b‖`` over all the leaves of two trees of the same structure (0 where ``a == b``,
    e.g. for empty trees)."""
    chex.assert_trees_all_equal_structs(a, b)
    flat_a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)] + [[]])
    flat_b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)] + [[]])
    difference = np.linalg.norm(flat_a - flat_b)
    return 0.0 if difference == 0 else float(difference / np.linalg.norm(flat_b))


def per_step_errors(a, b) -> list[float]:
    """``relative_error`` of two per-step trees (leading axis time, ``STEPS`` long) at every step."""
    return [relative_error(_at(a, t), _at(b, t)) for t in range(STEPS)]


def _floating(tree):
    return [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]


PER_STEP = ("carry", "out", "trace", "grad", "drop_in")
# What two runs of the same stream must agree on. Not the trace itself: a factored trace is not
# unique (r-OK's factors come from QR/SVD, whose signs and rotations may differ between a batched and
# a single LAPACK call while the influence they stand for, and so every gradient, agrees).
VALUES = ("carry", "out", "grad", "drop_in")


def check_shapes_and_dtypes(r: Result) -> None:
    dtype = jnp.dtype(r.dtype)
    for b, run in enumerate(r.loop):
        first = _at({k: run[k] for k in PER_STEP}, 0)
        # init's trace: floating leaves in the run's dtype; step returns the same structure
        assert all(leaf.dtype == dtype for leaf in _floating(r.init_trace_shape)), r.init_trace_shape
        chex.assert_trees_all_equal_shapes_and_dtypes(run["init_trace"], r.init_trace_shape)
        chex.assert_trees_all_equal_shapes_and_dtypes(first["trace"], r.init_trace_shape)
        # carry and output are the core's
        chex.assert_trees_all_equal_shapes_and_dtypes(first["carry"], _at(r.carries, b))
        chex.assert_trees_all_equal_shapes_and_dtypes(
            first["out"], jax.ShapeDtypeStruct(r.core.output_shape, dtype)
        )
        # the gradients have the parameters' structure, shapes and dtypes
        chex.assert_trees_all_equal_shapes_and_dtypes(first["grad"], r.params)
        chex.assert_trees_all_equal_shapes_and_dtypes(first["drop_in"], r.params)
        chex.assert_tree_all_finite({k: run[k] for k in PER_STEP})


def check_jit_does_not_recompile(r: Result) -> None:
    assert r.step_traces == 1, "jax.jit(step) was traced again for the trace and carry step returned"
    assert r.run_traces == 1, f"a jitted run was traced {r.run_traces} times for {BATCH} streams"


def check_vmap_equals_loop(r: Result) -> None:
    for b, run in enumerate(r.loop):
        batched = _at(r.batched, b)
        chex.assert_trees_all_equal_shapes_and_dtypes(batched, run)
        for part in VALUES:
            errors = per_step_errors(batched[part], run[part])
            assert max(errors) <= SAME[r.dtype], (b, part, errors)


def check_drop_in(r: Result) -> None:
    for b, run in enumerate(r.loop):
        errors = per_step_errors(run["drop_in"], run["grad"])
        assert max(errors) <= SAME[r.dtype], (b, errors)


def check_key(r: Result) -> None:
    if r.needs_key:
        error = r.keyless_errors["step"]
        assert error is not None and "key" in error, f"step without a key: {error}"
    else:
        # runs with key=None (the per-stream runs) and ignores the keys it is given (vmapped run)
        assert r.keyless_errors == {"init": None, "step": None}, r.keyless_errors
        for b, run in enumerate(r.loop):
            for part in VALUES:
                errors = per_step_errors(_at(r.batched[part], b), run[part])
                assert max(errors) <= SAME[r.dtype], ("keys changed", b, part, errors)


def check_restart(r: Result) -> None:
    chex.assert_trees_all_equal_shapes_and_dtypes(r.restarted, r.init_trace_shape)
    init_trace = r.loop[0]["init_trace"]
    chex.assert_trees_all_equal_shapes_and_dtypes(r.restarted_fresh, init_trace)
    assert relative_error(r.restarted_fresh, init_trace) <= SAME[r.dtype], "restart of a fresh trace"
    if not r.has_restart:
        assert relative_error(r.restarted, init_trace) <= SAME[r.dtype], "restart without learned parts"


def check_exactness(r: Result) -> None:
    assert r.dtype == "float64"
    errors = per_step_errors(r.loop[0]["grad"], r.bptt)
    if r.exact:
        assert max(errors) <= EXACT, f"exact_for says exact, per-step relative errors {errors}"
    else:
        assert max(errors) > NOT_EXACT, f"exact_for says not exact, yet per-step relative errors {errors}"


def check_all(r: Result) -> None:
    """Every check of this module on one computed case."""
    check_shapes_and_dtypes(r)
    check_jit_does_not_recompile(r)
    check_vmap_equals_loop(r)
    check_drop_in(r)
    check_key(r)
    check_restart(r)
    if r.dtype == "float64":
        check_exactness(r)
