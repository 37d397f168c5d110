"""Joint Kronecker factors (``joint=True`` of KF-RTRL, r-OK and reverse KF-RTRL): the groups found
in Flax's cells, KF-RTRL against an independent implementation of Mujika et al. 2018's tanh-RNN
update, unbiasedness against exact RTRL (z-test over keys), exactness of r-OK with enough rank, and
the conformance checks.

Reference (Mujika, Meier & Steger 2018, arXiv:1805.10842, Sec. 4 for ``h_t = tanh(z_t)``,
``z_t = x_t W_i + h_{t-1} W_h + b``): the trace of ``θ = [W_i; W_h; b]`` is ``u ⊗ A`` with
``u ∈ R^{in + n + 1}`` over ``a_t = [x_t; h_{t-1}; 1]`` and ``A ∈ R^{n × n}``; with
``φ' = 1 − h_t²``, ``D_t = diag(φ') W_hᵀ`` and ``G_t = diag(φ')``, one step is

    A' = D_t A,    p1 = sqrt(‖A'‖/‖u‖),    p2 = sqrt(‖G_t‖/‖a_t‖),
    u ← c1 p1 u + c2 p2 a_t,    A ← c1 A'/p1 + c2 G_t/p2,

the first term dropped while ``u = 0``. The gradient of ``c · h_t`` is ``c_s u_i A[s, j]``.

The z-test is the one of ``tests/test_uoro.py``: ``R = ‖mean − J‖² / (tr Σ̂ / N) ≤ Z² = 16`` for
``N`` keys, its scale the variance measured over the keys (``tr Σ̂ / N``, so the bound shrinks like
``1/N``); it must reject a bias as large as ``J``.
"""

import functools

import conformance
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax
from rtrl_jax._src import estimator_stats
from rtrl_jax._src.kronecker import kronecker_layout

pytestmark = pytest.mark.x64  # float64 exactness and statistics

Z = 4.0
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class TwoGatesCell(nn.RNNCellBase):
    """Two bias-free Dense layers whose outputs meet only after their own nonlinearities: no two
    kernels feed the same pre-activation."""

    features: int = 3

    @nn.compact
    def __call__(self, carry, x):
        gate = nn.sigmoid(nn.Dense(self.features, use_bias=False, name="gate")(x))
        new = gate * jnp.tanh(nn.Dense(self.features, use_bias=False, name="rec")(carry))
        return new, new

    def initialize_carry(self, rng, input_shape):
        return jnp.zeros((*input_shape[:-1], self.features))

    @property
    def num_feature_axes(self):
        return 1


def _problem(core, steps, seed=0):
    """Float64 parameters (standard normal over √(first dimension)), carry and inputs, drawn with
    NumPy: eager JAX draws would compile one program per shape."""
    rng = np.random.default_rng(seed)

    def draw(spec, scale=1.0):
        return jnp.asarray(scale / np.sqrt(spec.shape[0]) * rng.standard_normal(spec.shape), jnp.float64)

    params = jax.tree.map(draw, core.params_spec)
    carry = jax.tree.map(lambda s: draw(s, 0.5 * np.sqrt(s.shape[0])), core.carry_spec)
    inputs = jnp.asarray(rng.standard_normal((steps, *core.input_shape)), jnp.float64)
    return params, carry, inputs


def _groups(cell, input_size=2):
    """``[(kernel names, bias paths, u size)]`` of the joint layout, and the exactly tracked leaves."""
    core = rtrl_jax.from_linen(cell, input_size)
    layout = kronecker_layout(core, joint=True)
    paths = [
        "/".join(str(k.key) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(core.params_spec)[0]
    ]
    factors = [
        ([layout.kernels[k].path[-1] for k in f.kernels], [paths[i] for i in f.bias_leaves], f.in_size)
        for f in layout.factors
    ]
    return factors, [paths[i] for i in layout.other_leaves]


def test_groups_of_flax_cells():
    n, m = 3, 2  # units, inputs
    assert _groups(nn.SimpleCell(n)) == ([(["i", "h"], ["i/bias"], m + n + 1)], [])
    # GRU: the candidate's hn output is multiplied by the reset gate before it meets in's.
    assert _groups(nn.GRUCell(n)) == (
        [
            (["ir", "hr"], ["ir/bias"], m + n + 1),
            (["iz", "hz"], ["iz/bias"], m + n + 1),
            (["in"], ["in/bias"], m + 1),
            (["hn"], ["hn/bias"], n + 1),
        ],
        [],
    )
    assert _groups(nn.LSTMCell(n)) == (
        [([f"i{g}", f"h{g}"], [f"h{g}/bias"], m + n + 1) for g in "ifgo"],
        [],
    )
    assert _groups(nn.MGUCell(n)) == (
        [(["if", "hf"], ["if/bias"], m + n + 1), (["hn"], ["hn/bias"], n + 1), (["in"], ["in/bias"], m + 1)],
        [],
    )


def test_cell_without_shared_pre_activations_keeps_the_per_kernel_layout():
    core = rtrl_jax.from_linen(TwoGatesCell(), 2)
    assert kronecker_layout(core, joint=True) == kronecker_layout(core)
    assert len(kronecker_layout(core).factors) == 2


def test_joint_must_be_a_bool():
    core = rtrl_jax.from_linen(nn.SimpleCell(2), 2)
    for make in (rtrl_jax.kf_rtrl, rtrl_jax.reverse_kf_rtrl, functools.partial(rtrl_jax.ok, rank=2)):
        with pytest.raises(ValueError, match="joint must be True or False"):
            make(core, joint="yes")
    for name in ("kf", "ok", "rkf"):
        assert rtrl_jax.estimator_options(name)["joint"] is False


# --- KF-RTRL against Mujika et al.'s update, written out for the tanh RNN ---


def _mujika_tanh_rnn(w_i, w_h, b, h0, xs, keys, cotangents):
    """Per step: ``u``, ``A`` and the gradient of ``c_t · h_t`` as ``(W_i, W_h, b)``, with the merge
    signs drawn as ``kf_rtrl`` draws them (one factor: ``rademacher(split(key, 1)[0], (2,))``)."""
    n, m = w_h.shape[0], w_i.shape[0]

    def step(state, inputs):
        h, u, a = state
        x, key, c = inputs
        h_new = jnp.tanh(x @ w_i + h @ w_h + b)
        slope = 1.0 - h_new**2
        stacked = jnp.concatenate([x, h, jnp.ones(1)])
        moved = slope[:, None] * (w_h.T @ a)  # D_t A, D_t = diag(φ') W_hᵀ
        gate = jnp.diag(slope)  # G_t
        c1, c2 = jax.random.rademacher(jax.random.split(key, 1)[0], (2,), dtype=h.dtype)
        p2 = jnp.sqrt(jnp.linalg.norm(gate) / jnp.linalg.norm(stacked))
        first = jnp.linalg.norm(u) > 0
        p1 = jnp.sqrt(jnp.linalg.norm(moved) / jnp.where(first, jnp.linalg.norm(u), 1.0))
        u = jnp.where(first, c1 * p1 * u, 0.0) + c2 * p2 * stacked
        a = jnp.where(first, c1 * moved / jnp.where(first, p1, 1.0), 0.0) + c2 * gate / p2
        rows = jnp.outer(u, a.T @ c)  # ∂(c · h_t)/∂θ as rows over a_t
        grads = (rows[:m], rows[m : m + n], rows[m + n])
        return (h_new, u, a), (u, a, grads)

    state = (h0, jnp.zeros(m + n + 1), jnp.zeros((n, n)))
    return jax.lax.scan(step, state, (xs, keys, cotangents))[1]


def test_joint_kf_is_mujikas_update_on_the_tanh_rnn():
    n, m, steps = 5, 3, 20
    core = rtrl_jax.from_linen(nn.SimpleCell(n), m)
    params, h0, xs = _problem(core, steps)
    cotangents = jnp.asarray(np.random.default_rng(1).standard_normal((steps, n)), jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(5), steps)
    est = rtrl_jax.kf_rtrl(core, joint=True)

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def both():
        def body(state, inputs):
            carry, trace = state
            x, key, c = inputs
            carry, _, trace = est.step(trace, params, carry, x, key=key)
            return (carry, trace), (trace.u[0][0], trace.a[0][0].T, est.grad(trace, params, c))

        ours = jax.lax.scan(body, (h0, est.init(params, h0)), (xs, keys, cotangents))[1]
        w_i, w_h, b = params["i"]["kernel"], params["h"]["kernel"], params["i"]["bias"]
        return ours, _mujika_tanh_rnn(w_i, w_h, b, h0, xs, keys, cotangents)

    (u, a, grads), (ref_u, ref_a, (ref_wi, ref_wh, ref_b)) = both()
    assert float(jnp.abs(ref_a).min(axis=(1, 2)).max()) > 0  # a dense factor, not a zero trace
    assert float(jnp.abs(ref_wh).max()) > 0.1
    for got, want in [
        (u, ref_u),
        (a, ref_a),
        (grads["i"]["kernel"], ref_wi),
        (grads["h"]["kernel"], ref_wh),
        (grads["i"]["bias"], ref_b),
    ]:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# --- unbiased against exact RTRL, and exact r-OK ---


def _trajectory(cell, steps, input_size=2):
    core = rtrl_jax.from_linen(cell, input_size)
    return core, *_problem(core, steps)


def _exact(core, params, carry, inputs):
    """Exact RTRL's influence after ``inputs``."""
    return estimator_stats.final_influence(rtrl_jax.rtrl(core), params, carry, inputs, jax.random.PRNGKey(0))


def _z_test(core, estimator, params, carry, inputs, num, seed=7):
    """``R`` after ``num // 10`` and ``num`` keys, ``R`` against ``2 J`` (the test's power), the
    relative variance, and whether every sample is finite."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num)

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def stats(keys):
        exact = _exact(core, params, carry, inputs)
        samples = estimator_stats.sample_final_influences(estimator, params, carry, inputs, keys)
        ratios = [estimator_stats.mean_error_ratio(samples[:n], exact) for n in (num // 10, num)]
        wrong = estimator_stats.mean_error_ratio(samples, 2.0 * exact)
        variance = estimator_stats.relative_variance(samples, exact)
        return jnp.stack(ratios), wrong, variance, jnp.isfinite(samples).all()

    ratios, wrong, variance, finite = stats(keys)
    assert bool(finite)
    assert float(jnp.max(ratios)) <= Z**2, ratios
    assert float(wrong) > Z**2, wrong  # a bias as large as J would be seen
    assert float(variance) > 1e-6  # genuinely random: the ratio is not vacuous


ESTIMATORS = {
    "kf": lambda core: rtrl_jax.kf_rtrl(core, joint=True),
    "ok1": lambda core: rtrl_jax.ok(core, rank=1, joint=True),
    "ok2": lambda core: rtrl_jax.ok(core, rank=2, joint=True),
    "rkf": lambda core: rtrl_jax.reverse_kf_rtrl(core, joint=True),
}
CELLS = {"simple": lambda: nn.SimpleCell(4), "gru": lambda: nn.GRUCell(3), "lstm": lambda: nn.LSTMCell(3)}
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name, cell",
    [
        ("kf", "simple"),
        pytest.param("ok2", "gru", marks=SLOW),
        pytest.param("kf", "gru", marks=SLOW),
        pytest.param("ok1", "simple", marks=SLOW),
        pytest.param("ok2", "lstm", marks=SLOW),
        pytest.param("rkf", "simple", marks=SLOW),
        pytest.param("rkf", "gru", marks=SLOW),
    ],
)
def test_joint_estimators_are_unbiased(name, cell):
    core, params, carry, inputs = _trajectory(CELLS[cell](), steps=6)
    _z_test(core, ESTIMATORS[name](core), params, carry, inputs, 1000)


@pytest.mark.parametrize("cell", ["simple", pytest.param("gru", marks=SLOW)])
def test_joint_ok_with_enough_rank_is_exact_and_joint_kf_after_one_step(cell):
    steps = 4
    core, params, carry, inputs = _trajectory(CELLS[cell](), steps)

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def run(key):
        ok_full = rtrl_jax.ok(core, rank=steps, joint=True)
        kf = rtrl_jax.kf_rtrl(core, joint=True)
        return (
            _exact(core, params, carry, inputs),
            estimator_stats.final_influence(ok_full, params, carry, inputs, key),
            _exact(core, params, carry, inputs[:1]),
            estimator_stats.final_influence(kf, params, carry, inputs[:1], key),
        )

    exact, ok_full, exact_one, kf_one = run(jax.random.PRNGKey(11))
    assert float(jnp.abs(exact).max()) > 0.1
    np.testing.assert_allclose(ok_full, exact, rtol=0, atol=1e-10)
    np.testing.assert_allclose(kf_one, exact_one, rtol=0, atol=1e-10)
    # Exact in the registry's sense once the rank reaches every factor's stacked input (inputs,
    # units and the bias: 2 + n + 1), and not below; per kernel the largest input (n) is enough.
    n = core.output_shape[0]
    assert rtrl_jax.is_exact("ok", core, rank=n + 3, joint=True)
    assert not rtrl_jax.is_exact("ok", core, rank=n + 2, joint=True)
    assert rtrl_jax.is_exact("ok", core, rank=n)


@pytest.mark.slow  # two programs per estimator
@pytest.mark.parametrize("name", ["kf", "ok", "rkf"])
def test_conformance_with_joint_factors(name):
    info = rtrl_jax.get_estimator_info(name)
    conformance.check_all(conformance.compute(info, "gru", "float32", {"joint": True}))
