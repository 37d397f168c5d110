"""SK-RTRL: rank 0 is SnAp-1 and full rank exact RTRL at every step, the carried bound holds at every
step, the right factor stays orthonormal, the registry's exactness and the errors.

The exact influence ``J_t`` comes from :func:`rtrl_jax.influence_matrix` of an exact RTRL trace; the
estimate ``Ĵ_t`` from the same function of SK-RTRL's trace.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax
from rtrl_jax._src.sketched import sketched_rtrl

pytestmark = pytest.mark.x64  # float64 exactness checks

STEPS = 7
TOL = 1e-10


def _problem(cell, input_size=2, seed=0):
    core = rtrl_jax.from_linen(cell, input_size)
    params, carry = core.init(jax.random.PRNGKey(seed), dtype=jnp.float64)
    carry = jax.tree.map(lambda c: 0.3 + c, carry)  # a non-zero start
    xs = jax.random.normal(jax.random.PRNGKey(seed + 1), (STEPS, input_size), jnp.float64)
    return core, params, carry, xs


def _per_step(core, params, carry, xs, estimators):
    """Per estimator: the influence matrices ``(T, S, P)``, the carried bounds ``(T,)`` (zeros for a
    trace without one) and the right factors at every step; one compilation for all."""

    @jax.jit
    def run():
        results = []
        for est in estimators:

            def emit(h, out, trace, est=est):
                bound = getattr(trace, "bound", jnp.zeros(()))
                right = getattr(trace, "right", jnp.zeros((0, 0)))
                return rtrl_jax.influence_matrix(est, trace, params, h), bound, right

            results.append(rtrl_jax.rollout(est, params, carry, xs, emit=emit)[2])
        return results

    return run()


CELLS = {
    "lstm": lambda: nn.LSTMCell(features=2),  # units of two carry entries (c_k, h_k)
    "gru": lambda: nn.GRUCell(features=3),
    "simple": lambda: nn.SimpleCell(features=4),
}


@pytest.mark.parametrize(
    "cell_name",
    ["lstm", pytest.param("gru", marks=pytest.mark.slow), pytest.param("simple", marks=pytest.mark.slow)],
)
def test_rank_zero_is_snap1_full_rank_is_rtrl_and_the_bound_holds(cell_name):
    core, params, carry, xs = _problem(CELLS[cell_name]())
    size = core.carry_size
    estimators = [
        rtrl_jax.rtrl(core),
        rtrl_jax.snap(core, 1),
        sketched_rtrl(core, 0),
        sketched_rtrl(core, 1),
        sketched_rtrl(core, 2, append=1),
        sketched_rtrl(core, 1, append=size),  # no pre-projection below full rank
        sketched_rtrl(core, size),
    ]
    (exact, _, _), (snap1, _, _), *sketched = _per_step(core, params, carry, xs, estimators)
    scale = float(jnp.abs(exact).max())
    assert scale > 0.1
    # r = 0 is SnAp-1 and r = S exact RTRL, at every step
    np.testing.assert_allclose(sketched[0][0], snap1, rtol=0, atol=TOL * scale)
    np.testing.assert_allclose(sketched[-1][0], exact, rtol=0, atol=TOL * scale)
    assert float(jnp.abs(sketched[-1][1]).max()) <= TOL * scale  # and its bound says so
    # SnAp-1 is not exact here, so the bounds below are not vacuous
    assert float(jnp.abs(snap1 - exact).max()) > 1e-3
    for influence, bound, right in sketched:
        error = jnp.sqrt(jnp.sum((influence - exact) ** 2, axis=(1, 2)))
        assert bool(jnp.all(error <= bound * (1 + 1e-9) + 1e-12)), (error, bound)
        # the rows of Rᵀ are orthonormal or zero at every step
        gram = jnp.einsum("tip,tjp->tij", right, right)
        diagonal = jnp.diagonal(gram, axis1=1, axis2=2)
        assert bool(jnp.all((jnp.abs(diagonal) < 1e-10) | (jnp.abs(diagonal - 1) < 1e-10)))
        np.testing.assert_allclose(gram - jax.vmap(jnp.diag)(diagonal), 0.0, atol=1e-10)
    # the truncations did drop something at rank 1 (the bound grows), and rank 1 beats SnAp-1 here
    error_r1 = jnp.sqrt(jnp.sum((sketched[1][0] - exact) ** 2, axis=(1, 2)))
    error_r0 = jnp.sqrt(jnp.sum((sketched[0][0] - exact) ** 2, axis=(1, 2)))
    assert float(sketched[1][1][-1]) > 0
    assert float(error_r1[-1]) < float(error_r0[-1])


def test_registry_exactness_and_options():
    gru = rtrl_jax.from_linen(nn.GRUCell(features=3), 2)
    assert rtrl_jax.estimator_options("sketched") == {"rank": 1, "append": None}
    assert not rtrl_jax.get_estimator_info("sketched").needs_key
    assert rtrl_jax.is_exact("sketched", gru, rank=3)
    assert rtrl_jax.is_exact("sketched", gru, rank=10)
    assert not rtrl_jax.is_exact("sketched", gru, rank=2)
    assert not rtrl_jax.is_exact("sketched", gru, rank=3, append=2)  # pre-projection drops mass
    # SnAp-1 is exact on element-wise recurrences, and so is every rank
    assert rtrl_jax.is_exact("sketched", rtrl_jax.from_linen(rtrl_jax.ELSTMCell(3), 2), rank=0)


def test_errors():
    gru = rtrl_jax.from_linen(nn.GRUCell(features=2), 2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            sketched_rtrl(gru, bad)
    with pytest.raises(ValueError, match="append"):
        sketched_rtrl(gru, 1, append=0)
    with pytest.raises(ValueError, match=r"estimator 'sketched' cannot serve .*Estimators that can"):
        rtrl_jax.make_estimator("sketched", lambda params, carry, x: (carry, carry))


def test_bound_saturates_instead_of_overflowing_in_float32():
    # ‖D‖_2 ≈ 3.5 at every step (a non-normal recurrence whose state stays small): the bound grows
    # like 3.5^t and would pass float32's largest value after ~70 steps.
    def apply(params, h, x):
        new = jnp.tanh(params["a"] @ h + params["b"] @ x)
        return new, new

    params = {
        "a": jnp.array([[0.5, 3.0, 0.0], [0.0, 0.5, 3.0], [0.0, 0.0, 0.5]], jnp.float32),
        "b": jnp.ones((3, 2), jnp.float32),
    }
    core = rtrl_jax.from_function(apply, params=params, carry=jnp.zeros(3, jnp.float32), input_shape=(2,))
    xs = 1e-2 * jax.random.normal(jax.random.PRNGKey(1), (300, 2), jnp.float32)
    carry = jnp.zeros(3, jnp.float32)
    for rank in (0, 1):
        estimator = sketched_rtrl(core, rank)
        _, trace, _ = jax.jit(lambda e=estimator: rtrl_jax.rollout(e, params, carry, xs))()
        assert trace.bound.dtype == jnp.float32
        assert float(trace.bound) == float(jnp.finfo(jnp.float32).max), rank
