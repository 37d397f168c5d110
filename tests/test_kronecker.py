"""KF-RTRL and r-OK: Dense capture, exactness, closed-form variances of one reduction, errors,
and the variance ordering against exact RTRL.

Closed forms (derived in the module docstrings). For two terms ``X1 = u ⊗ A'``, ``X2 = a ⊗ G``
the KF merge with scales ``p1² = ‖A'‖/‖u‖``, ``p2² = ‖G‖/‖a‖`` errs by
``c1 c2 (p1/p2 · u ⊗ G + p2/p1 · a ⊗ A')``, so

    Var_KF = 2 ‖u‖ ‖A'‖ ‖a‖ ‖G‖ + 2 (u·a) ⟨A', G⟩.

The OK reduction of a rank-(r+1) matrix with singular values σ keeps the first m and replaces the
tail by ``(s/q)(I − w wᵀ)`` (s = tail sum, q = r − m), whose deviation from ``diag(σ_tail)`` has
``E‖·‖² = (s/q)² q − Σ σ_tail² = s²/q − Σ_{i>m} σ_i²``.
"""

import functools
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax
from rtrl_jax._src import estimator_stats, kronecker
from rtrl_jax._src.kronecker import kronecker_layout, unsupported_reason
from rtrl_jax._src.tasks import add_task_baselines

pytestmark = pytest.mark.x64  # float64 exactness checks

TOL = 1e-10
# Compile time is nearly all of the cost of the programs these tests jit themselves: they are
# compiled with XLA's backend optimisation off.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class _VectorCell(nn.RNNCellBase):
    """A cell with a zero carry of ``features`` units."""

    features: int = 4

    def initialize_carry(self, rng, input_shape):
        return jnp.zeros((*input_shape[:-1], self.features))

    @property
    def num_feature_axes(self):
        return 1


class DenseUserCell(_VectorCell):
    """A user cell: two stacked Dense layers, a shared Dense applied twice, an element-wise weight."""

    features: int = 4

    @nn.compact
    def __call__(self, carry, x):
        gate = nn.sigmoid(nn.Dense(self.features, name="gate")(jnp.concatenate([carry, x])))
        hidden = jnp.tanh(nn.Dense(self.features, name="inner")(x))
        shared = nn.Dense(self.features, use_bias=False, name="shared")
        mixed = nn.Dense(self.features, name="outer")(hidden) + shared(carry) + shared(0.5 * carry)
        decay = self.param("decay", nn.initializers.constant(0.3), (self.features,))
        new = gate * jnp.tanh(mixed) + decay * carry
        return new, new


class NoDenseCell(_VectorCell):
    features: int = 3

    @nn.compact
    def __call__(self, carry, x):
        w = self.param("w", nn.initializers.normal(), (self.features,))
        new = jnp.tanh(w * carry + x.sum())
        return new, new


def _influences(core, estimators, steps, seed=0):
    params, carry = core.init(jax.random.PRNGKey(seed), dtype=jnp.float64)
    carry = jax.tree.map(
        lambda c: 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 2), c.shape, c.dtype), carry
    )
    inputs = jax.random.normal(jax.random.PRNGKey(seed + 1), (steps, core.input_shape[0]), jnp.float64)

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def run(key):
        return [estimator_stats.final_influence(est, params, carry, inputs, key) for est in estimators]

    return run(jax.random.PRNGKey(11))


CELLS = {
    "simple": lambda: nn.SimpleCell(features=5),
    "gru": lambda: nn.GRUCell(features=4),
    "lstm": lambda: nn.LSTMCell(features=3),
    "user": lambda: DenseUserCell(features=4),
}


def test_layout_finds_each_dense_kernel_once():
    names = {
        name: sorted(k.path[-1] for k in kronecker_layout(rtrl_jax.from_linen(make(), 3)).kernels)
        for name, make in CELLS.items()
    }
    assert names["simple"] == ["h", "i"]
    assert names["gru"] == ["hn", "hr", "hz", "in", "ir", "iz"]
    assert names["lstm"] == ["hf", "hg", "hi", "ho", "if", "ig", "ii", "io"]
    # "shared" is applied twice per step: not one Kronecker term, so it is tracked exactly.
    assert names["user"] == ["gate", "inner", "outer"]


# Default run: the GRU and the user cell (stacked, shared and element-wise parameters); the tanh RNN
# and the LSTM under -m slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "cell_name", ["gru", "user", pytest.param("simple", marks=SLOW), pytest.param("lstm", marks=SLOW)]
)
def test_ok_with_enough_rank_is_exact_rtrl_and_kf_is_exact_after_one_step(cell_name):
    core = rtrl_jax.from_linen(CELLS[cell_name](), 3)
    steps = 4
    exact, ok_full = _influences(core, [rtrl_jax.rtrl(core), rtrl_jax.ok(core, rank=steps)], steps)
    assert float(jnp.abs(exact).max()) > 0.1
    np.testing.assert_allclose(ok_full, exact, rtol=0, atol=TOL)
    one = _influences(core, [rtrl_jax.rtrl(core), rtrl_jax.kf_rtrl(core), rtrl_jax.ok(core)], 1)
    np.testing.assert_allclose(one[1], one[0], rtol=0, atol=TOL)
    np.testing.assert_allclose(one[2], one[0], rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "cell_name", ["gru", pytest.param("simple", marks=SLOW), pytest.param("user", marks=SLOW)]
)
def test_explicit_and_per_row_dynamics_give_the_same_trace(cell_name, monkeypatch):
    """``D_t`` is applied either by one JVP per stored row or, when the cell's JVP costs several
    matrix-vector products (a GRU), by forming ``D_t`` once; both are the same recursion. (KF-RTRL
    and an exact-rank r-OK: a truncating r-OK draws its signs in a basis whose orientation LAPACK
    may pick differently for inputs that differ by rounding, a different but equally valid sample.)"""
    core = rtrl_jax.from_linen(CELLS[cell_name](), 3)
    traces = []
    for matvecs in (1.0, 1e6):  # the first never forms D_t, the second always does
        monkeypatch.setattr(kronecker, "carry_jvp_matvecs", lambda core, m=matvecs: m)
        estimators = [rtrl_jax.kf_rtrl(core), rtrl_jax.ok(core, rank=5)]
        traces.append(_influences(core, estimators, steps=5))
    assert float(jnp.abs(traces[0][1]).max()) > 0.1
    for per_row, formed in zip(*traces, strict=True):
        np.testing.assert_allclose(formed, per_row, rtol=0, atol=1e-12)


def test_carry_jvp_cost_counts_the_hidden_kernels():
    """In ``S × S`` matrix-vector products (plus element-wise work): the tanh RNN has one ``n × n``
    hidden kernel, the GRU three, the LSTM four ``n × n`` kernels on a carry of ``S = 2n``."""
    assert 1.0 <= kronecker.carry_jvp_matvecs(rtrl_jax.from_linen(nn.SimpleCell(64), 3)) < 1.1
    assert 3.0 <= kronecker.carry_jvp_matvecs(rtrl_jax.from_linen(nn.GRUCell(64), 3)) < 3.3
    assert 1.0 <= kronecker.carry_jvp_matvecs(rtrl_jax.from_linen(nn.LSTMCell(64), 3)) < 1.1


def test_grad_matches_influence_and_batches_with_vmap():
    core = rtrl_jax.from_linen(nn.GRUCell(features=4), 3)
    params, carry = core.init(jax.random.PRNGKey(0), dtype=jnp.float64)
    est = rtrl_jax.ok(core, rank=2)
    xs = jax.random.normal(jax.random.PRNGKey(1), (5, 2, 3), jnp.float64)

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def run(xs, keys):
        def stream(x, key):
            def body(state, inputs):
                c, trace = state
                x_t, t = inputs
                c, _, trace = est.step(trace, params, c, x_t, key=jax.random.fold_in(key, t))
                return (c, trace), None

            steps = jnp.arange(x.shape[0])
            return jax.lax.scan(body, (carry, est.init(params, carry)), (x, steps))[0]

        return jax.vmap(stream, in_axes=(1, 0))(xs, keys)

    carries, traces = run(xs, jax.random.split(jax.random.PRNGKey(2), 2))
    trace0 = jax.tree.map(lambda a: a[0], traces)
    bar = jax.random.normal(jax.random.PRNGKey(3), (4,), jnp.float64)
    grads = est.grad(trace0, params, bar)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    matrix = rtrl_jax.influence_matrix(est, trace0, params, carries[0])
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grads)[0], bar @ matrix, atol=1e-12)
    assert traces.u[0].shape == (2, 2, 3) or traces.u[0].shape[:2] == (2, 2)


# --- one reduction: unbiasedness and closed-form variance, by enumerating every sign pattern ---


def _terms(key, k, in_size=4, size=3, out_size=5, spread=1.0):
    ku, ka = jax.random.split(key)
    u = jax.random.normal(ku, (k, in_size), jnp.float64)
    a = jax.random.normal(ka, (k, size, out_size), jnp.float64)
    scales = spread ** jnp.arange(k, dtype=jnp.float64)
    return u * scales[:, None], a


def _matrix(u, a):
    return jnp.einsum("qi,qsj->sij", u, a)


@functools.cache
def _enumerator(rank):
    """``(u, a) -> (mean, E‖error‖², target)`` over every sign pattern of one reduction of ``rank +
    1`` terms to ``rank`` (``rank=None``: the KF merge of 2 terms), jitted once per rank."""
    if rank is None:
        reduce, k = rtrl_jax.kf_merge, 2
    else:
        reduce, k = functools.partial(rtrl_jax.ok_reduce, rank=rank), rank + 1

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def run(u, a):
        signs = jnp.array(list(itertools.product((-1.0, 1.0), repeat=k)), u.dtype)
        outs = jax.vmap(lambda s: _matrix(*reduce(u, a, s)))(signs)
        target = _matrix(u, a)
        return outs.mean(0), jnp.mean(jnp.sum((outs - target) ** 2, axis=(1, 2, 3))), target

    return run


def _enumerate(rank, u, a):
    return _enumerator(rank)(u, a)


def _kf_variance(u, a):
    nu, na = jnp.linalg.norm(u, axis=1), jnp.linalg.norm(a, axis=(1, 2))
    return 2 * nu[0] * na[0] * nu[1] * na[1] + 2 * jnp.dot(u[0], u[1]) * jnp.sum(a[0] * a[1])


def _ok_variance(u, a, rank):
    c = _matrix(u, a)
    sigma = np.linalg.svd(np.asarray(jnp.moveaxis(c, 1, 0).reshape(u.shape[1], -1)), compute_uv=False)
    sigma = np.pad(sigma, (0, max(0, rank + 1 - sigma.size)))[: rank + 1]
    for m in range(rank):
        tail = sigma[m:]
        if (rank - m) * sigma[m] <= tail.sum():
            return tail.sum() ** 2 / (rank - m) - np.sum(tail**2), m
    raise AssertionError("no feasible m")


def test_kf_merge_unbiased_with_closed_form_variance():
    for seed in range(20):
        u, a = _terms(jax.random.PRNGKey(seed), 2, spread=[0.1, 1.0, 10.0][seed % 3])
        mean, variance, target = _enumerate(None, u, a)
        np.testing.assert_allclose(mean, target, atol=1e-12)
        np.testing.assert_allclose(variance, _kf_variance(u, a), rtol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_ok_reduction_unbiased_with_closed_form_variance(rank):
    used_m = set()
    for seed in range(12):
        spread = [1.0, 0.2, 0.05][seed % 3]
        u, a = _terms(jax.random.PRNGKey(100 + seed), rank + 1, spread=spread)
        if seed % 4 == 3:  # orthogonal terms of similar size: flat spectrum, the whole of it mixed
            u = jnp.eye(rank + 1, 6) * (1.0 + 0.1 * jnp.arange(rank + 1.0))[:, None]
            a = jnp.linalg.qr(a.reshape(rank + 1, -1).T)[0].T.reshape(a.shape)
        mean, variance, target = _enumerate(rank, u, a)
        expected, m = _ok_variance(u, a, rank)
        used_m.add(m)
        np.testing.assert_allclose(mean, target, atol=1e-11)
        np.testing.assert_allclose(variance, expected, rtol=1e-9, atol=1e-12)
    if rank > 1:
        assert len(used_m) > 1, used_m  # both kept (m > 0) and fully mixed (m = 0) tails covered


def test_ok_reduction_with_too_few_inputs_is_exact():
    u, a = _terms(jax.random.PRNGKey(3), 4, in_size=2)  # rank of C ≤ 2 ≤ r = 3
    out = rtrl_jax.ok_reduce(u, a, jnp.ones(4), 3)
    assert out[0].shape == (3, 2) and out[1].shape == (3, 3, 5)
    np.testing.assert_allclose(_matrix(*out), _matrix(u, a), atol=1e-12)


def test_one_ok_variance_never_above_kf():
    for seed in range(50):
        u, a = _terms(jax.random.PRNGKey(200 + seed), 2, spread=[0.1, 1.0, 3.0][seed % 3])
        if seed % 5 == 0:  # nearly aligned terms, where KF's cross term matters most
            u = u.at[1].set(u[0] + 0.1 * u[1])
        _, ok_var, _ = _enumerate(1, u, a)
        _, kf_var, _ = _enumerate(None, u, a)
        assert ok_var <= kf_var * (1 + 1e-12) + 1e-14, (seed, ok_var, kf_var)


# --- errors ---


def test_clear_error_for_cells_without_dense_kernels():
    core = rtrl_jax.from_linen(NoDenseCell(), 2)
    assert "NoDenseCell" in unsupported_reason(core)
    for name, make in [("kf", rtrl_jax.kf_rtrl), ("ok", rtrl_jax.ok)]:
        with pytest.raises(ValueError, match=r"NoDenseCell.*Estimators that can: .*uoro"):
            make(core)
        with pytest.raises(ValueError, match=rf"estimator '{name}' cannot serve core 'NoDenseCell'"):
            rtrl_jax.make_estimator(name, core)

    def apply(params, carry, x):
        return jnp.tanh(params @ carry + x), jnp.tanh(params @ carry + x)

    plain = rtrl_jax.from_function(apply, params=jnp.eye(2), carry=jnp.zeros(2), input_shape=(2,))
    with pytest.raises(ValueError, match=r"flax.linen cell.*Estimators that can: .*uoro"):
        rtrl_jax.kf_rtrl(plain)
    with pytest.raises(ValueError, match="rank"):
        rtrl_jax.ok(rtrl_jax.from_linen(nn.GRUCell(features=2), 2), rank=0)
    assert rtrl_jax.estimator_options("ok") == {"rank": 1, "joint": False}


# --- variance against exact RTRL (small version of benchmarks/variance_vs_n.py) ---


@pytest.mark.slow  # 200 samples from each of 5 estimators
def test_variance_ordering_small():
    core = rtrl_jax.from_linen(nn.SimpleCell(features=8), 4)
    params, carry = core.init(jax.random.PRNGKey(0), dtype=jnp.float64)
    inputs = jax.random.normal(jax.random.PRNGKey(1), (15, 4), jnp.float64)
    exact = estimator_stats.final_influence(rtrl_jax.rtrl(core), params, carry, inputs, jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(5), 200)
    estimators = {
        "uoro": rtrl_jax.uoro(core),
        "kf": rtrl_jax.kf_rtrl(core),
        "ok1": rtrl_jax.ok(core, rank=1),
        "ok2": rtrl_jax.ok(core, rank=2),
        "ok4": rtrl_jax.ok(core, rank=4),
    }
    variance = {
        name: float(
            estimator_stats.relative_variance(
                jax.jit(
                    lambda k, est=est: estimator_stats.sample_final_influences(est, params, carry, inputs, k),
                    compiler_options=COMPILER_OPTIONS,
                )(keys),
                exact,
            )
        )
        for name, est in estimators.items()
    }
    assert variance["uoro"] > variance["kf"] >= variance["ok1"] > variance["ok2"] > variance["ok4"], variance


# --- learning: the trainer learns the add task with KF and 2-OK on a GRU ---


@pytest.mark.slow  # 3000 training steps per estimator
@pytest.mark.parametrize("name, options", [("kf", {}), ("ok", {"rank": 2})])
def test_trainer_learns_add_task_with_kronecker_estimators(name, options):
    from online_learning import add_task_loss

    core = rtrl_jax.from_linen(nn.GRUCell(features=16), 2)
    estimator = rtrl_jax.make_estimator(name, core, **options)
    learned = add_task_loss(core, estimator)
    readout = add_task_loss(core, estimator, readout_only=True)
    no_memory = add_task_baselines()["no_memory"]
    assert learned < readout - 0.03, (learned, readout)
    assert learned < no_memory - 0.05, (learned, no_memory)


def _compiled_uses_parameter(hlo_text: str, index: int) -> bool:
    """Whether the entry computation of optimised HLO reads its parameter ``index``."""
    entry = hlo_text[hlo_text.index("ENTRY") :]
    match = re.search(rf"(%\S+) = \S+ parameter\({index}\)", entry)
    return match is not None and entry.count(match.group(1) + ",") + entry.count(match.group(1) + ")") > 0


def test_after_keeps_the_dependency_on_cpu_without_mixing_values():
    """The serialisation of LAPACK calls rests on ``after`` reading its dependencies in the
    compiled CPU program (an ``optimization_barrier`` is dropped by XLA:CPU, a data dependency is
    not); a non-finite dependency must not leak into the result."""
    from rtrl_jax._src.kronecker import after

    x = {"a": jnp.arange(3.0), "b": jnp.array([True, False]), "c": jnp.arange(2)}
    deps = (jnp.ones((2, 2)), jnp.zeros(0))
    same = jax.jit(after)(x, deps)
    for got, want in zip(jax.tree.leaves(same), jax.tree.leaves(x), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        np.testing.assert_array_equal(jax.jit(after)(jnp.arange(3.0), jnp.array([bad, 1.0])), jnp.arange(3.0))
    assert after(x, ()) is x

    def only_a(a, dep):
        return after(a, dep)

    hlo = jax.jit(only_a).lower(jnp.arange(3.0), jnp.ones(2)).compile().as_text()
    assert _compiled_uses_parameter(hlo, 1), hlo
    without = jax.jit(lambda a, dep: a).lower(jnp.arange(3.0), jnp.ones(2)).compile().as_text()
    assert not _compiled_uses_parameter(without, 1), without


@pytest.mark.parametrize(
    "platform, serialised", [("cpu", True), ("cuda", False), ("rocm", False), ("tpu", False)]
)
def test_after_serialises_only_when_lowered_for_cpu(platform, serialised):
    """The CPU workaround is chosen per platform at lowering: a GPU or TPU program has no select
    on the dependency and does not read it."""
    from jax import export

    from rtrl_jax._src.kronecker import after

    exported = export.export(jax.jit(after), platforms=[platform])(jnp.arange(3.0), jnp.ones(2))
    assert ("stablehlo.select" in exported.mlir_module()) == serialised


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_after_on_every_backend_orders_every_platform(platform):
    """An order that bounds memory (exact RTRL's block updates) is kept on every platform."""
    from jax import export

    from rtrl_jax._src.base import after

    def ordered(a, dep):
        return after(a, dep, every_backend=True)

    exported = export.export(jax.jit(ordered), platforms=[platform])(jnp.arange(3.0), jnp.ones(2))
    assert "stablehlo.select" in exported.mlir_module()


def test_a_non_finite_trace_does_not_reach_the_next_estimator(x64):
    """Estimators run one after the other on a shared trajectory; one whose trace is all NaN must
    leave the next one's gradients exactly as when it runs alone."""
    from rtrl_jax._src.compare import gradient_trajectory

    core = rtrl_jax.from_linen(nn.SimpleCell(features=4), 2)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    xs = jax.random.normal(jax.random.PRNGKey(1), (5, 2), jnp.float64)
    ys = jax.random.normal(jax.random.PRNGKey(2), (5, 4), jnp.float64)

    def loss_fn(out, y):
        return 0.5 * jnp.sum((out - y) ** 2)

    exact = rtrl_jax.rtrl(core)
    broken = rtrl_jax.Estimator(
        lambda p, c, *, key=None: jax.tree.map(lambda t: t * jnp.nan, exact.init(p, c)),
        exact.step,
        exact.grad,
    )
    key = jax.random.PRNGKey(0)

    def run(estimators):
        return gradient_trajectory(core, estimators, exact, params, carry, xs, ys, loss_fn, key=key)

    both = run({"a_broken": broken, "b_exact": exact})
    alone = run({"b_exact": exact})
    assert bool(jnp.all(jnp.isnan(both.grads["a_broken"])))
    assert bool(jnp.array_equal(both.grads["b_exact"], alone.grads["b_exact"]))
