"""The library's cells: Flax conventions, reference equations, masks, and the estimators serving them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax

CELLS = {
    "lru_complex": lambda: rtrl_jax.LRUCell(3),
    "lru_real": lambda: rtrl_jax.LRUCell(3, complex_state=False),
    "elstm": lambda: rtrl_jax.ELSTMCell(3),
    "sparse_rnn": lambda: rtrl_jax.SparseRNNCell(4, density=0.5),
    "sparse_gru": lambda: rtrl_jax.SparseGRUCell(4, density=0.5),
    "leaky_rnn": lambda: rtrl_jax.LeakyRNNCell(3, tau=3.0),
}


@pytest.mark.parametrize("name", list(CELLS))
def test_linen_conventions(name):
    cell = CELLS[name]()
    assert isinstance(cell, nn.RNNCellBase)
    assert cell.num_feature_axes == 1
    batch_carry = cell.initialize_carry(jax.random.PRNGKey(0), (5, 2))
    assert all(leaf.shape[0] == 5 for leaf in jax.tree.leaves(batch_carry))
    # nn.RNN scans the cell over a batch of sequences.
    rnn = nn.RNN(cell)
    xs = jnp.ones((5, 7, 2), jnp.float32)
    variables = rnn.init(jax.random.PRNGKey(1), xs)
    outs = rnn.apply(variables, xs)
    assert outs.shape[:2] == (5, 7)
    assert bool(jnp.all(jnp.isfinite(outs)))


@pytest.mark.parametrize("name", list(CELLS))
def test_every_estimator_serves_the_cell(name):
    """Which estimators serve the cell; that each of them runs on it (shapes, dtypes, jit, vmap, the
    drop-in, exactness where registered) is tests/test_conformance.py's (these cells under -m slow)."""
    core = rtrl_jax.from_linen(CELLS[name](), 2)
    assert {"rtrl", "snap", "rflo", "tbptt", "uoro"} <= set(rtrl_jax.estimators_for(core))


@pytest.mark.x64  # float64 reference equations
def test_lru_matches_complex_reference():
    cell = rtrl_jax.LRUCell(4, r_min=0.4, r_max=0.9)
    core = rtrl_jax.from_linen(cell, 3)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    lam = np.exp(-np.exp(params["nu_log"]) + 1j * np.exp(params["theta_log"]))
    assert np.all((np.abs(lam) >= 0.4 - 1e-6) & (np.abs(lam) <= 0.9 + 1e-6))
    np.testing.assert_allclose(np.exp(params["gamma_log"]), np.sqrt(1 - np.abs(lam) ** 2), rtol=1e-5)
    b = params["B_re"]["kernel"] + 1j * params["B_im"]["kernel"]  # (in, units)
    gamma = np.exp(params["gamma_log"])
    h = np.zeros(4, complex)
    xs = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64))
    for x in xs:
        carry, out = core(params, carry, x)
        h = lam * h + gamma * (x @ b)
        np.testing.assert_allclose(out, np.concatenate([h.real, h.imag]), atol=1e-12)


@pytest.mark.x64  # float64 reference equations
def test_real_lru():
    core = rtrl_jax.from_linen(rtrl_jax.LRUCell(4, complex_state=False), 2)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    assert "theta_log" not in params and "B_im" not in params
    lam = np.exp(-np.exp(params["nu_log"]))
    x = jnp.array([1.0, -2.0], jnp.float64)
    carry, _ = core(params, carry + 1.0, x)
    expected = lam + np.exp(params["gamma_log"]) * (x @ params["B_re"]["kernel"])
    np.testing.assert_allclose(carry, expected, atol=1e-12)


@pytest.mark.x64  # float64 reference equations
def test_elstm_matches_equations():
    core = rtrl_jax.from_linen(rtrl_jax.ELSTMCell(3), 2)
    params, _ = core.init(jax.random.PRNGKey(0), jnp.float64)
    c = jnp.array([0.5, -1.0, 2.0], jnp.float64)
    x = jnp.array([0.3, -0.7], jnp.float64)
    (new_c, new_h), out = core.apply(params, (c, jnp.zeros(3, jnp.float64)), x)

    def gate(name):
        return x @ params[name]["kernel"] + params[name]["bias"] + params[f"w_{name}"] * c

    f, z, o = jax.nn.sigmoid(gate("f")), jnp.tanh(gate("z")), jax.nn.sigmoid(gate("o"))
    np.testing.assert_allclose(new_c, f * c + (1 - f) * z, atol=1e-12)
    np.testing.assert_allclose(new_h, o * new_c, atol=1e-12)
    np.testing.assert_allclose(out, new_h)


def test_random_mask_density_and_seed():
    mask = rtrl_jax.random_mask((100, 100), 0.1, seed=3)
    assert 0.08 < mask.mean() < 0.12
    np.testing.assert_array_equal(mask, rtrl_jax.random_mask((100, 100), 0.1, seed=3))
    assert not np.array_equal(mask, rtrl_jax.random_mask((100, 100), 0.1, seed=4))
    assert np.all(np.diag(rtrl_jax.random_mask((10, 10), 0.1, keep_diagonal=True)) == 1)
    with pytest.raises(ValueError, match="density"):
        rtrl_jax.random_mask((3, 3), 0.0)


@pytest.mark.x64  # float64 reference equations
def test_masked_weights_do_not_act_and_get_no_gradient():
    cell = rtrl_jax.SparseRNNCell(6, density=0.3, seed=2)
    core = rtrl_jax.from_linen(cell, 2)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    mask = cell.recurrent_mask()
    assert 0 < mask.sum() < 36
    xs = jax.random.normal(jax.random.PRNGKey(1), (4, 2), jnp.float64)

    def loss(p):
        _, outs = rtrl_jax.unroll(core, p, carry + 0.5, xs)
        return jnp.sum(outs**2)

    g = jax.grad(loss)(params)["recurrent_kernel"]
    np.testing.assert_array_equal(np.asarray(g)[mask == 0], 0.0)
    assert np.all(np.asarray(g)[mask == 1] != 0)
    # Changing a masked-out weight changes nothing.
    bumped = jax.tree.map(lambda a: a, params)
    off = np.argwhere(mask == 0)[0]
    bumped["recurrent_kernel"] = params["recurrent_kernel"].at[tuple(off)].add(5.0)
    np.testing.assert_array_equal(loss(bumped), loss(params))


def test_sparse_gru_masks():
    cell = rtrl_jax.SparseGRUCell(8, density=0.25, seed=1)
    masks = cell.recurrent_masks()
    assert set(masks) == {"r", "z", "n"}
    assert not np.array_equal(masks["r"], masks["z"])
    core = rtrl_jax.from_linen(cell, 2)
    patterns = rtrl_jax.sparsity_patterns(core)
    # unit i reads unit j only where a mask keeps (j, i) or through the z ⊙ h self path.
    union = (masks["r"] + masks["z"] + masks["n"]).T > 0
    dynamics = patterns.dynamics.toarray()
    np.testing.assert_array_equal(dynamics & ~np.eye(8, dtype=bool), union & ~np.eye(8, dtype=bool))


@pytest.mark.x64  # float64 reference equations
def test_leaky_cell():
    cell = rtrl_jax.LeakyRNNCell(3, tau=4.0)
    assert cell.leak == pytest.approx(0.75)
    core = rtrl_jax.from_linen(cell, 2)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    new, _ = core(params, carry + 1.0, jnp.zeros(2, jnp.float64))
    z = jnp.ones(3) @ params["recurrent"]["kernel"] + params["input"]["bias"]
    np.testing.assert_allclose(new, 0.75 + 0.25 * np.tanh(z), atol=1e-12)
