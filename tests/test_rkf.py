"""Reverse KF-RTRL: unbiased against exact RTRL (z-test over keys), the closed-form variance of one
step's reduction (enumerating every sign), the reverse layout, and its errors.

Closed form (derived in :mod:`rtrl_jax._src.reverse_kf`). With ``X1 = (D B) ⊗ b`` the propagated
term and ``I = a ⊗ G`` the immediate one, one step's estimate ``J̃`` (signs ``ν ∈ {±1}^out``, which
also randomise the merge) has mean ``X1 + I`` and

    E‖J̃ − X1 − I‖² = E_ν[2 ‖b‖ ‖D B‖ ‖ν‖ ‖G ν‖ ‖a‖] + 2 ⟨X1, I⟩ + (out − 1) ‖a‖² ‖G‖².

The z-test is the one of ``tests/test_uoro.py``: ``R = ‖mean − J‖² / (tr Σ̂ / N) ≤ Z² = 16``.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax
from rtrl_jax._src import estimator_stats, reverse_kf
from rtrl_jax._src.kf_rtrl import kf_merge
from rtrl_jax._src.kronecker import reverse_immediate

pytestmark = pytest.mark.x64  # float64 statistics

Z = 4.0
STEPS = 6


def _trajectory(cell, input_size=2, seed=0):
    core = rtrl_jax.from_linen(cell, input_size)
    params, carry = core.init(jax.random.PRNGKey(seed), dtype=jnp.float64)
    inputs = jax.random.normal(jax.random.PRNGKey(seed + 1), (STEPS, input_size), jnp.float64)
    exact = estimator_stats.final_influence(rtrl_jax.rtrl(core), params, carry, inputs, jax.random.PRNGKey(0))
    return core, params, carry, inputs, exact


def _ratio_and_variance(estimator, params, carry, inputs, exact, num, seed=7):
    """``R`` after ``num // 10`` and ``num`` keys, ``R`` against ``2 J`` (a bias as large as ``J``,
    which the test must reject: its power; R-KF's variance is several times ``‖J‖²``), the relative
    variance and whether every sample is finite."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num)

    @jax.jit
    def stats(keys):
        samples = estimator_stats.sample_final_influences(estimator, params, carry, inputs, keys)
        ratios = [estimator_stats.mean_error_ratio(samples[:n], exact) for n in (num // 10, num)]
        wrong = estimator_stats.mean_error_ratio(samples, 2.0 * exact)
        variance = estimator_stats.relative_variance(samples, exact)
        return jnp.stack(ratios), wrong, variance, jnp.isfinite(samples).all()

    return stats(keys)


def test_unbiased_on_a_fixed_trajectory_and_the_test_has_power():
    core, params, carry, inputs, exact = _trajectory(nn.SimpleCell(features=4))
    ratios, wrong, variance, finite = _ratio_and_variance(
        rtrl_jax.reverse_kf_rtrl(core), params, carry, inputs, exact, 600
    )
    assert bool(finite)
    assert float(jnp.max(ratios)) <= Z**2, ratios
    assert float(wrong) > Z**2, wrong  # a bias as large as J would be seen
    assert float(variance) > 1e-6  # genuinely random: the ratio is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("cell", [lambda: nn.GRUCell(features=3), lambda: nn.LSTMCell(features=3)])
def test_unbiased_on_gated_cells(cell):
    core, params, carry, inputs, exact = _trajectory(cell())
    ratios, wrong, variance, finite = _ratio_and_variance(
        rtrl_jax.reverse_kf_rtrl(core), params, carry, inputs, exact, 2000
    )
    assert float(wrong) > Z**2, wrong
    assert bool(finite)
    assert float(jnp.max(ratios)) <= Z**2, ratios
    assert float(variance) > 1e-6


# --- one step's reduction: mean and closed-form variance over every sign pattern ---


def _step_terms(key, in_size=3, out_size=3, size=4):
    kb, kB, ka, kg = jax.random.split(key, 4)
    b = jax.random.normal(kb, (out_size,), jnp.float64)  # output-side factor
    moved = jax.random.normal(kB, (in_size, size), jnp.float64)  # D B, stored transposed
    a = jax.random.normal(ka, (in_size,), jnp.float64)
    g = jax.random.normal(kg, (out_size, size), jnp.float64)  # Gᵀ
    return b, moved, a, g


def _tensor(u, a):  # J[s, i, j] from the reverse factors u (out,), a (in, S)
    return jnp.einsum("j,is->sij", u, a)


def _one_step(b, moved, a, g, nu, c):
    """One step; ``c = None``: the estimator's merge, else KF's merge with the signs ``c``."""
    u_imm, a_imm = reverse_immediate(a, g, nu)
    u, a = jnp.stack([b, u_imm]), jnp.stack([moved, a_imm])
    u, new = reverse_kf._merge(u, a, None) if c is None else kf_merge(u, a, c)
    return _tensor(u[0], new[0])


@functools.partial(jax.jit, static_argnames="with_signs")
def _mean_and_variance(b, moved, a, g, nus, with_signs=False):
    """Mean and ``E‖J̃ − X1 − I‖²`` of one step over every ``ν`` in ``nus`` (and, ``with_signs``,
    every pair of extra merge signs ``c1, c2``)."""
    cs = jnp.array(list(itertools.product((-1.0, 1.0), repeat=2))) if with_signs else [None]
    outs = jnp.stack([jax.vmap(lambda nu, c=c: _one_step(b, moved, a, g, nu, c))(nus) for c in cs], axis=1)
    outs = outs.reshape(-1, *outs.shape[2:])
    target = _tensor(b, moved) + jnp.einsum("i,js->sij", a, g)
    return outs.mean(0), jnp.mean(jnp.sum((outs - target) ** 2, axis=(1, 2, 3))), target


def _closed_form_variance(b, moved, a, g, nus):
    out = b.shape[0]
    norm_g_nu = jnp.linalg.norm(nus @ g, axis=1)  # ‖G ν‖ for every ν
    first = 2 * jnp.linalg.norm(b) * jnp.linalg.norm(moved) * jnp.sqrt(out) * norm_g_nu * jnp.linalg.norm(a)
    cross = 2 * jnp.sum(_tensor(b, moved) * jnp.einsum("i,js->sij", a, g))
    return first.mean() + cross + (out - 1) * jnp.sum(a**2) * jnp.sum(g**2)


@pytest.mark.parametrize("out_size", [1, 3])
def test_one_step_unbiased_with_closed_form_variance(out_size):
    nus = jnp.array(list(itertools.product((-1.0, 1.0), repeat=out_size)), jnp.float64)
    for seed in range(6):
        b, moved, a, g = _step_terms(jax.random.PRNGKey(seed), out_size=out_size)
        moved = moved * [0.1, 1.0, 10.0][seed % 3]
        if seed == 5:  # the first step: nothing propagated, the merge keeps the sign estimate of I
            b, moved = jnp.zeros_like(b), jnp.zeros_like(moved)
        expected = _closed_form_variance(b, moved, a, g, nus)
        for with_signs in (False, True):  # extra merge signs change nothing
            mean, variance, target = _mean_and_variance(b, moved, a, g, nus, with_signs=with_signs)
            np.testing.assert_allclose(mean, target, rtol=0, atol=1e-12)
            np.testing.assert_allclose(variance, expected, rtol=1e-10, atol=1e-12)
        if out_size == 1:  # ν = ±1 makes the immediate term exact: only KF's merge variance is left
            kf = 2 * jnp.linalg.norm(b) * jnp.linalg.norm(moved) * jnp.linalg.norm(g) * jnp.linalg.norm(a)
            kf += 2 * jnp.sum(_tensor(b, moved) * jnp.einsum("i,js->sij", a, g))
            np.testing.assert_allclose(variance, kf, rtol=1e-10, atol=1e-12)


# --- layout, gradient and errors ---


def test_reverse_layout_and_grad_matches_influence():
    core = rtrl_jax.from_linen(nn.GRUCell(features=3), 2)
    params, carry = core.init(jax.random.PRNGKey(0), dtype=jnp.float64)
    est = rtrl_jax.reverse_kf_rtrl(core)
    xs = jax.random.normal(jax.random.PRNGKey(1), (3, 2), jnp.float64)

    @jax.jit
    def run(key):
        carry_t, trace, _ = rtrl_jax.rollout(est, params, carry, xs, key=key)
        bar = jnp.arange(1.0, 4.0)
        grads = est.grad(trace, params, bar)
        return trace, grads, bar @ rtrl_jax.influence_matrix(est, trace, params, carry_t)

    trace, grads, expected = run(jax.random.PRNGKey(2))
    kernels = rtrl_jax._src.kronecker.kronecker_layout(core).kernels
    for kernel, u, a in zip(kernels, trace.u, trace.a, strict=True):
        assert u.shape == (1, kernel.out_size) and a.shape == (1, kernel.in_size, 3)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grads)[0], expected, atol=1e-12)
    assert float(jnp.abs(expected).max()) > 1e-3


def test_refuses_cells_without_dense_kernels_and_names_the_alternatives():
    def apply(params, carry, x):
        return jnp.tanh(params @ carry + x), jnp.tanh(params @ carry + x)

    plain = rtrl_jax.from_function(apply, params=jnp.eye(2), carry=jnp.zeros(2), input_shape=(2,))
    with pytest.raises(ValueError, match=r"estimator 'rkf' cannot serve .*Estimators that can: .*uoro"):
        rtrl_jax.make_estimator("rkf", plain)
    with pytest.raises(ValueError, match=r"flax.linen cell"):
        rtrl_jax.reverse_kf_rtrl(plain)
    info = rtrl_jax.get_estimator_info("rkf")
    assert info.needs_key and dict(info.options) == {"joint": False}
    assert not rtrl_jax.is_exact("rkf", rtrl_jax.from_linen(nn.SimpleCell(features=2), 2))
