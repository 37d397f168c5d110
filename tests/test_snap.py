"""SnAp-n: masks from the cell's own structure, compressed trace, exactness limits, learning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from online_learning import add_task_loss, jit, rollout
from scipy.sparse.csgraph import shortest_path

import rtrl_jax
from rtrl_jax._src.snap import _read_rows, _rows_per_leaf, layout_from_mask
from rtrl_jax._src.tasks import add_task_baselines

pytestmark = pytest.mark.x64  # float64 exactness checks

W_EXAMPLE = np.array([[1, 1, 1], [0, 1, 0], [1, 0, 1]])


def _masked_rnn_core(w_pattern):
    """``h' = tanh(W h + x)`` whose parameters are the non-zero entries of ``W`` (row-major)."""
    index = np.nonzero(w_pattern)
    size = w_pattern.shape[0]

    def apply(p, h, x):
        w = jnp.zeros((size, size), p.dtype).at[index].set(p)
        new = jnp.tanh(w @ h + x)
        return new, new

    return rtrl_jax.from_function(
        apply, params=jnp.ones(len(index[0])), carry=jnp.zeros(size), input_shape=(size,)
    )


def test_mask_example_from_function_core():
    core = _masked_rnn_core(W_EXAMPLE)
    snap1 = rtrl_jax.snap_mask(core, 1).toarray().astype(int)
    snap2 = rtrl_jax.snap_mask(core, 2).toarray().astype(int)
    np.testing.assert_array_equal(snap1, [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(snap2, [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [1, 1, 1, 0, 1, 1]])
    patterns = rtrl_jax.sparsity_patterns(core)
    np.testing.assert_array_equal(patterns.dynamics.toarray(), W_EXAMPLE != 0)


def test_mask_example_from_patterns():
    immediate = np.zeros((3, 6), bool)
    for col, (row, _) in enumerate(zip(*np.nonzero(W_EXAMPLE), strict=True)):
        immediate[row, col] = True
    snap2 = rtrl_jax.snap_mask_from_patterns(immediate, W_EXAMPLE, 2).toarray().astype(int)
    np.testing.assert_array_equal(snap2, [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [1, 1, 1, 0, 1, 1]])
    snap3 = rtrl_jax.snap_mask_from_patterns(immediate, W_EXAMPLE, 3).toarray().astype(int)
    np.testing.assert_array_equal(snap3[2], np.ones(6))


def test_mask_example_sparse_cell():
    # The library's masked cell with the example's mask: the kept columns are the kernel entries
    # W[i, j] != 0, stored in Dense layout (in, out) = (j, i).
    cell = rtrl_jax.SparseRNNCell(3, mask=tuple(map(tuple, W_EXAMPLE.T)))
    core = rtrl_jax.from_linen(cell, 2)
    offset = core.num_params - 9  # the recurrent kernel is the last leaf
    cols = [offset + j * 3 + i for i, j in zip(*np.nonzero(W_EXAMPLE), strict=True)]
    for n, expected in [
        (1, [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]]),
        (2, [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [1, 1, 1, 0, 1, 1]]),
    ]:
        mask = rtrl_jax.snap_mask(core, n).toarray()
        np.testing.assert_array_equal(mask[:, cols].astype(int), expected)
        masked_out = [offset + k for k in range(9) if k not in {c - offset for c in cols}]
        assert not mask[:, masked_out].any()


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_diagonal_recurrence_gives_identity(n):
    core = _masked_rnn_core(np.eye(4, dtype=int))
    np.testing.assert_array_equal(rtrl_jax.snap_mask(core, n).toarray(), np.eye(4, dtype=bool))


def _run(core, estimator, params, carry, xs):
    return rollout(core, estimator, params, carry, xs)[2]


def _setup(core, steps=5, seed=0):
    params, carry = core.init(jax.random.PRNGKey(seed), jnp.float64)
    carry = jax.tree.map(lambda c: c + 0.3, carry)
    xs = jax.random.normal(jax.random.PRNGKey(seed + 1), (steps, *core.input_shape), jnp.float64)
    return params, carry, xs


def _diameter(dynamics):
    dist = shortest_path(sp.csr_matrix(dynamics, dtype=float), unweighted=True)
    return int(np.max(dist[np.isfinite(dist)]))


@pytest.mark.parametrize(
    "cell",
    [
        rtrl_jax.SparseRNNCell(6, density=0.3, keep_diagonal=True, seed=1),
        nn.GRUCell(features=3),
        nn.LSTMCell(features=2),
    ],
    ids=["sparse_rnn", "gru", "lstm"],
)
def test_snap_at_diameter_plus_one_is_exact_rtrl(cell):
    core = rtrl_jax.from_linen(cell, 2)
    params, carry, xs = _setup(core)
    exact = _run(core, rtrl_jax.rtrl(core), params, carry, xs)
    patterns = rtrl_jax.sparsity_patterns(core)
    n = _diameter(patterns.dynamics) + 1
    np.testing.assert_allclose(_run(core, rtrl_jax.snap(core, n), params, carry, xs), exact, atol=1e-10)
    # SnAp-1 is a true approximation for these cells.
    assert float(jnp.max(jnp.abs(_run(core, rtrl_jax.snap(core, 1), params, carry, xs) - exact))) > 1e-3


def _masked_rtrl(core, params, carry, xs, mask, leak=None):
    """The definition, densely: ``J_t = (I_t + D_t J_{t-1}) ⊙ M`` (``D_t`` replaced by ``leak``)."""

    def body(state, x):
        carry, jac = state
        carry, _, dynamics, immediate = rtrl_jax.dynamics_and_immediate(core.apply, params, carry, x)
        immediate = jnp.concatenate(jax.tree.leaves(immediate), axis=0).T
        propagated = dynamics @ jac if leak is None else leak * jac
        return (carry, (immediate + propagated) * mask), None

    run = jit(lambda carry, xs: jax.lax.scan(body, (carry, jnp.zeros(mask.shape, jnp.float64)), xs)[0][1])
    return run(carry, xs)


def _assert_snap1_follows_masked_recursion(core, steps):
    params, carry, xs = _setup(core, steps=steps)
    layout = rtrl_jax.snap_layout(core, 1)
    mask = np.zeros((core.carry_size, core.num_params))
    mask[layout.rows, layout.cols] = 1.0
    np.testing.assert_allclose(
        _run(core, rtrl_jax.snap(core, 1), params, carry, xs),
        _masked_rtrl(core, params, carry, xs, mask),
        atol=1e-12,
    )


def _assert_rflo_follows_masked_recursion(core, steps, leak):
    params, carry, xs = _setup(core, steps=steps)
    immediate_mask = rtrl_jax.sparsity_patterns(core).immediate.toarray().astype(float)
    np.testing.assert_allclose(
        _run(core, rtrl_jax.rflo(core, leak=leak), params, carry, xs),
        _masked_rtrl(core, params, carry, xs, immediate_mask, leak=leak),
        atol=1e-12,
    )


@pytest.mark.parametrize(
    "cell",
    [nn.SimpleCell(4), nn.GRUCell(3), nn.LSTMCell(2), rtrl_jax.LeakyRNNCell(4, tau=3.0)],
    ids=["simple", "gru", "lstm", "leaky"],
)
def test_snap1_and_rflo_follow_the_masked_recursion(cell):
    """SnAp-1 and RFLO (per-parameter trace for most cells, compressed general trace for the
    LSTM's two-entry units) against the dense masked recursion of their definitions."""
    core = rtrl_jax.from_linen(cell, 2)
    _assert_snap1_follows_masked_recursion(core, steps=6)
    _assert_rflo_follows_masked_recursion(core, steps=6, leak=0.7)


def test_snap1_without_self_recurrence_is_the_immediate_jacobian():
    """``h' = tanh(W h + x)`` with a zero diagonal: SnAp-1 keeps ``J[i, W_ij]``, which ``D`` never
    feeds (``D[i, i] = 0``), so the trace is ``I_t`` on the mask at every step."""
    core = _masked_rnn_core(np.array([[0, 1, 1], [1, 0, 0], [1, 1, 0]]))
    layout = rtrl_jax.snap_layout(core, 1)
    assert layout.pair_out.size == 0 and layout.rows.size == core.num_params
    _assert_snap1_follows_masked_recursion(core, steps=4)


def test_per_parameter_rows_are_compact_and_read_exactly():
    """A kernel's rows vary along its output axis only: they are kept with size 1 on the input axis
    and read by a slice; rows that repeat or jump (the masked RNN's entries) are read by a gather,
    and SnAp-1 / RFLO on that cell still follow the masked recursion."""
    rows = np.array([0, 1, 2, 0, 1, 2, 5, 3, 3, 4])  # kernel (2, 3): output rows 0..2; then (4,)
    params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    compact = _rows_per_leaf(rows, params)
    np.testing.assert_array_equal(compact["a"], [[0, 1, 2]])
    np.testing.assert_array_equal(compact["b"], [5, 3, 3, 4])
    vector = jnp.arange(6.0) * 10
    np.testing.assert_array_equal(_read_rows(vector, compact["a"]), [[0.0, 10.0, 20.0]])
    np.testing.assert_array_equal(_read_rows(vector, compact["b"]), [50.0, 30.0, 30.0, 40.0])

    core = _masked_rnn_core(W_EXAMPLE)  # diagonal entries: D[i, i] propagates
    _assert_snap1_follows_masked_recursion(core, steps=5)
    _assert_rflo_follows_masked_recursion(core, steps=5, leak=0.6)


def test_snap_order_two_on_sparse_cell_lies_between():
    cell = rtrl_jax.SparseRNNCell(8, density=0.2, seed=3)
    core = rtrl_jax.from_linen(cell, 2)
    sizes = [rtrl_jax.snap_layout(core, n).rows.size for n in (1, 2, 3)]
    assert sizes[0] < sizes[1] < sizes[2] <= core.carry_size * core.num_params


ELEMENTWISE = {
    "lru_complex": rtrl_jax.LRUCell(3),
    "lru_real": rtrl_jax.LRUCell(3, complex_state=False),
    "elstm": rtrl_jax.ELSTMCell(3),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_snap1_equals_bptt_on_elementwise_cells(name):
    core = rtrl_jax.from_linen(ELEMENTWISE[name], 2)
    steps = 6
    params, carry, xs = _setup(core, steps)
    out_size = core.output(carry).shape[0]
    weights = jax.random.normal(jax.random.PRNGKey(7), (steps, out_size), jnp.float64)
    estimator = rtrl_jax.snap(core, 1)

    @jit
    def online(params):
        def body(state, inputs):
            carry, trace = state
            x, w = inputs
            carry, _, trace = estimator.step(trace, params, carry, x)
            return (carry, trace), rtrl_jax.online_grad(core, estimator, trace, params, carry, w)

        _, grads = jax.lax.scan(body, (carry, estimator.init(params, carry)), (xs, weights))
        return grads

    @jit
    def bptt(params):
        def weighted(p, selector):
            _, outs = rtrl_jax.unroll(core, p, carry, xs)
            return jnp.sum(selector[:, None] * weights * outs)

        per_step = jax.vmap(jax.grad(weighted), in_axes=(None, 0))(params, jnp.eye(steps))
        return per_step, jax.grad(weighted)(params, jnp.ones(steps))

    online_grads = online(params)
    per_step, total = bptt(params)
    for a, b in zip(jax.tree.leaves(online_grads), jax.tree.leaves(per_step), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-10)
    summed = jax.tree.map(lambda g: jnp.sum(g, axis=0), online_grads)
    for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(total), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-10)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(total)) > 1e-3


def test_snap1_trace_is_order_p_for_dense_gru():
    # 64 units: wide enough that badly scaled pattern probes would saturate units and miss entries.
    core = rtrl_jax.from_linen(nn.GRUCell(features=64), 3)
    params, carry = core.init(jax.random.PRNGKey(0))
    estimator = rtrl_jax.snap(core, 1)
    trace = estimator.init(params, carry)
    assert rtrl_jax.tree_size(trace) == core.num_params
    assert rtrl_jax.tree_size(trace) * core.carry_size == rtrl_jax.tree_size(
        rtrl_jax.rtrl(core).init(params, carry)
    )
    layout = rtrl_jax.snap_layout(core, 1)
    assert int(layout.row_colour.max()) + 1 == 1  # the immediate Jacobian in one vjp
    # The step keeps the size, under jit and a batch vmap.
    carries = jax.tree.map(lambda c: jnp.stack([c, c + 1.0]), carry)
    traces = jax.vmap(lambda c: estimator.init(params, c))(carries)
    step = jax.jit(jax.vmap(lambda t, c, x: estimator.step(t, params, c, x)))
    _, _, traces = step(traces, carries, jnp.ones((2, 3), jnp.float32))
    assert rtrl_jax.tree_size(traces) == 2 * core.num_params
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(traces))


def test_elementwise_cells_need_few_passes():
    for cell, colours in [(rtrl_jax.ELSTMCell(8), 1), (rtrl_jax.LRUCell(8), 2)]:
        layout = rtrl_jax.snap_layout(rtrl_jax.from_linen(cell, 2), 1)
        assert int(layout.d_colour.max()) + 1 <= colours
        assert int(layout.row_colour.max()) + 1 <= 2


def test_units():
    immediate = rtrl_jax.sparsity_patterns(rtrl_jax.from_linen(nn.LSTMCell(3), 2)).immediate
    units = rtrl_jax.find_units(immediate)
    # carry (c, h): c_k and h_k form unit k.
    np.testing.assert_array_equal(units[:3], units[3:])
    assert len(set(units.tolist())) == 3
    lru = rtrl_jax.from_linen(rtrl_jax.LRUCell(2), 2)
    patterns = rtrl_jax.sparsity_patterns(lru)
    np.testing.assert_array_equal(rtrl_jax.find_units(patterns.immediate), [0, 1, 0, 1])
    entries = rtrl_jax.snap_mask_from_patterns(*patterns, 1, units="entries")
    auto = rtrl_jax.snap_mask_from_patterns(*patterns, 1)
    assert entries.nnz < auto.nnz
    explicit = rtrl_jax.snap_mask_from_patterns(*patterns, 1, units=np.array([0, 1, 0, 1]))
    assert (explicit != auto).nnz == 0


def test_bad_arguments():
    core = _masked_rnn_core(W_EXAMPLE)
    with pytest.raises(ValueError, match="order"):
        rtrl_jax.snap(core, 0)
    with pytest.raises(ValueError, match="units"):
        rtrl_jax.snap(core, 1, units="neurons")
    with pytest.raises(TypeError, match="rtrl_jax.Core"):
        rtrl_jax.snap(lambda p, h, x: (h, h), 1)
    with pytest.raises(ValueError, match="immediate pattern"):
        layout_from_mask(np.zeros((3, 6), bool), np.ones((3, 6), bool), W_EXAMPLE)


def test_registry():
    core = rtrl_jax.from_linen(rtrl_jax.ELSTMCell(2), 2)
    assert set(rtrl_jax.estimator_options("snap")) >= {"n", "units", "num_probes"}
    estimator = rtrl_jax.make_estimator("snap", core, n=2)
    params, carry = core.init(jax.random.PRNGKey(0))
    _, _, trace = estimator.step(estimator.init(params, carry), params, carry, jnp.ones(2, jnp.float32))
    assert isinstance(trace, rtrl_jax.SnapState)
    with pytest.raises(ValueError, match="cannot serve"):
        rtrl_jax.make_estimator("snap", lambda p, h, x: (h, h))


@pytest.mark.slow  # 3000 training steps
def test_trainer_learns_add_task_with_snap1():
    core = rtrl_jax.from_linen(nn.GRUCell(features=16), 2)
    estimator = rtrl_jax.snap(core, 1)
    learned = add_task_loss(core, estimator)
    readout = add_task_loss(core, estimator, readout_only=True)
    no_memory = add_task_baselines()["no_memory"]
    assert learned < readout - 0.03, (learned, readout)
    assert learned < no_memory - 0.05, (learned, no_memory)
