"""Traces stored in a narrower dtype: every estimator's stored leaves, the rounding of one step, the
error bound of exact RTRL over many steps, and the bytes a memory estimate reads."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax
from rtrl_jax._src.rtrl import dynamics_and_immediate

HIDDEN = 4
INPUT = 2
NO_BACKEND_OPTIMISATION = {"xla_backend_optimization_level": 0}  # small programs: compiling is the cost


def _is_float(leaf):
    return jnp.issubdtype(leaf.dtype, jnp.floating)


def _unit_roundoff(dtype):
    return float(jnp.finfo(dtype).eps) / 2


@pytest.fixture(scope="module")
def gru():
    core = rtrl_jax.from_linen(nn.GRUCell(features=HIDDEN), INPUT)
    params, carry = core.init(jax.random.PRNGKey(0))
    return core, params, carry


FAST = ("rtrl", "uoro")  # the rest of the registry under -m slow


def _served_names():
    core = rtrl_jax.from_linen(nn.GRUCell(features=HIDDEN), INPUT)
    return [info.name for info in rtrl_jax.registered() if info.unsupported_reason(core) is None]


def test_dense_estimators_are_served_on_the_gru():
    assert {"rtrl", "uoro", "kf", "ok", "snap", "rflo", "sketched"} <= set(_served_names())


@pytest.mark.parametrize(
    "name", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in _served_names()]
)
def test_stored_trace_is_in_the_dtype_and_one_float32_step_is_rounded_once(gru, name):
    """The stored trace has the float32 trace's structure with its float32 leaves in bfloat16
    (after ``init`` and ``step``), its other leaves unchanged, half the floating bytes; one step is
    the float32 step from the stored trace, rounded once to nearest (so within ``u |J|`` of it,
    ``u`` the unit roundoff); carry and output are the float32 ones."""
    core, params, carry = gru
    x = jnp.array([0.3, -0.7], jnp.float32)
    key = jax.random.PRNGKey(1)
    u = _unit_roundoff(jnp.bfloat16)
    options = dict(rtrl_jax.get_estimator_info(name).example_options)
    wide = rtrl_jax.make_estimator(name, core, **options)
    narrow = rtrl_jax.make_estimator(name, core, trace_dtype="bfloat16", **options)

    @functools.partial(jax.jit, compiler_options=NO_BACKEND_OPTIMISATION)
    def run():
        wide_init = wide.init(params, carry, key=key)
        stored = narrow.init(params, carry, key=key)
        loaded = jax.tree.map(lambda s, w: s.astype(w.dtype), stored, wide_init)
        return (
            wide_init,
            stored,
            wide.step(loaded, params, carry, x, key=key),
            narrow.step(stored, params, carry, x, key=key),
        )

    wide_init, stored, want, got = run()
    assert jax.tree.structure(stored) == jax.tree.structure(wide_init)
    for s, w in zip(jax.tree.leaves(stored), jax.tree.leaves(wide_init), strict=True):
        assert s.dtype == (jnp.bfloat16 if w.dtype == jnp.float32 else w.dtype), (s.dtype, w.dtype)
    floating = sum(w.nbytes for w in jax.tree.leaves(wide_init) if _is_float(w))
    assert (
        rtrl_jax.trace_bytes(narrow, params, carry)
        == rtrl_jax.trace_bytes(wide, params, carry) - floating // 2
    )

    for g, w in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2]), strict=True):
        np.testing.assert_array_equal(g, w)
    for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2]), strict=True):
        if w.dtype != jnp.float32:
            np.testing.assert_array_equal(g, w)
            continue
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(g, w.astype(jnp.bfloat16))
        assert bool(jnp.all(jnp.abs(g.astype(jnp.float32) - w) <= u * jnp.abs(w)))


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_exact_rtrl_error_stays_within_the_propagated_rounding_bound(dtype, x64):
    """A float64 model with its RTRL trace stored in ``dtype``: the stored trace's error against the
    float64 trace obeys ``‖e_t‖ ≤ ‖D_t‖₂ ‖e_{t-1}‖ + u/(1-u) ‖Ĵ_t‖`` (each step's rounding is at most
    ``u`` relative, ``Ĵ`` the stored trace, then propagated by ``D_t``), with float64 arithmetic's
    own error ~1e-16 negligible; the gradients read from the two traces obey the same bound times
    ``‖c_t‖``. The error is not zero: the trace really is rounded."""
    core = rtrl_jax.from_linen(nn.SimpleCell(features=HIDDEN), INPUT)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    xs = jax.random.normal(jax.random.PRNGKey(1), (20, INPUT), jnp.float64)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (HIDDEN,), jnp.float64)
    exact = rtrl_jax.rtrl(core)
    stored = rtrl_jax.make_estimator("rtrl", core, trace_dtype=dtype)
    u = _unit_roundoff(dtype)

    def body(state, x):
        carry, trace, approx, bound = state
        _, _, dynamics, _ = dynamics_and_immediate(core, params, carry, x)
        new_carry, _, trace = exact.step(trace, params, carry, x)
        _, _, approx = stored.step(approx, params, carry, x)
        approx_flat = jnp.concatenate(
            [b.astype(jnp.float64).ravel() for b in jax.tree.leaves(approx.influence)]
        )
        exact_flat = jnp.concatenate([b.ravel() for b in jax.tree.leaves(trace.influence)])
        bound = jnp.linalg.norm(dynamics, 2) * bound + u / (1 - u) * jnp.linalg.norm(approx_flat)
        grad_error = jnp.linalg.norm(
            jax.flatten_util.ravel_pytree(stored.grad(approx, params, cotangent))[0]
            - jax.flatten_util.ravel_pytree(exact.grad(trace, params, cotangent))[0]
        )
        return (new_carry, trace, approx, bound), (
            jnp.linalg.norm(approx_flat - exact_flat),
            grad_error,
            bound,
        )

    init = (carry, exact.init(params, carry), stored.init(params, carry), jnp.zeros((), jnp.float64))
    _, (error, grad_error, bound) = jax.jit(
        lambda: jax.lax.scan(body, init, xs), compiler_options=NO_BACKEND_OPTIMISATION
    )()
    assert bool(jnp.all(error <= bound)), (error, bound)
    assert bool(jnp.all(grad_error <= bound * jnp.linalg.norm(cotangent))), (grad_error, bound)
    assert float(error[-1]) > 0


@pytest.mark.slow  # builds two runs (about 20 s on the shared machine)
def test_a_run_config_takes_trace_dtype_and_its_memory_estimate_halves_the_traces():
    from rtrl_jax.experiment import load_config
    from rtrl_jax.experiment.build import build

    wide, narrow = (
        build(load_config(None, ["estimator=rtrl", "model.hidden=8", *extra]))
        for extra in ([], ["estimator_options.trace_dtype=bfloat16"])
    )
    assert {leaf.dtype for leaf in jax.tree.leaves(narrow.state.trace)} == {jnp.dtype(jnp.bfloat16)}
    assert narrow.memory.trace_bytes * 2 == wide.memory.trace_bytes
