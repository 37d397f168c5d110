"""e-prop and the LIF / ALIF spiking cells.

- exact RTRL through the spiking cells equals BPTT through them (the same pseudo-derivative);
- e-prop equals exact RTRL where the paper says it does: no recurrent coupling (``W_rec = 0``);
- e-prop equals an independent NumPy implementation of Bellec et al.'s eligibility traces
  (``ε^v``, ``ε^a``, ``e = ψ (ε^v − β ε^a)``) for LIF and ALIF, refractoriness included;
- the cells run under ``nn.RNN`` and agree with the core; refractory neurons do not spike;
- e-prop's neurons and registry entry.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax
from rtrl_jax._src.eprop import neuron_units
from rtrl_jax._src.spiking import ALIFState, LIFState, pseudo_derivative

pytestmark = pytest.mark.x64

INPUT, STEPS = 3, 30
TOL = 1e-10


def _problem(cell, seed=0, recurrent_scale=1.0):
    """Float64 parameters (recurrent kernel scaled), a zero carry and strong inputs, so that the
    neurons spike and sit inside the pseudo-derivative's support at many steps."""
    core = rtrl_jax.from_linen(cell, INPUT)
    params, carry = core.init(jax.random.PRNGKey(seed), jnp.float64)
    params["recurrent"]["kernel"] = recurrent_scale * params["recurrent"]["kernel"]
    xs = 1.5 * jax.random.normal(jax.random.PRNGKey(seed + 1), (STEPS, INPUT), jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(seed + 2))
    weights = {
        "z": jax.random.normal(keys[0], (STEPS, cell.features), jnp.float64),
        "v": jax.random.normal(keys[1], (STEPS, cell.features), jnp.float64),
    }
    return core, params, carry, xs, weights


def _carry_loss(carry, w):
    """A step loss on the spikes and the membranes (so that every row of ``J`` is checked)."""
    return jnp.sum(w["z"] * carry.z) + jnp.sum(w["v"] * jnp.sin(carry.v))


def _spike_loss(carry, w):
    """A step loss on the spikes only: its learning signal is ``L_t = w_t``."""
    return jnp.sum(w["z"] * carry.z)


def _online(core, estimator, params, carry, xs, weights, loss):
    """Per-step ``estimator.grad`` of ``loss(h_t, w_t)`` (leading axis time) and the carries."""

    def body(state, inputs):
        trace, h = state
        x, w = inputs
        h, _, trace = estimator.step(trace, params, h, x)
        return (trace, h), (estimator.grad(trace, params, jax.grad(loss)(h, w)), h)

    run = jax.jit(lambda p, c, xs, ws: jax.lax.scan(body, (estimator.init(p, c), c), (xs, ws))[1])
    return jax.device_get(run(params, carry, xs, weights))


def _bptt(core, params, carry, xs, weights, loss):
    """Per-step BPTT gradients ``∇_θ L_t`` (``jax.jacrev`` of the per-step losses through ``lax.scan``)."""

    def losses(p):
        _, carries = jax.lax.scan(lambda h, x: (core(p, h, x)[0],) * 2, carry, xs)
        return jax.vmap(loss)(carries, weights)

    return jax.device_get(jax.jit(jax.jacrev(losses))(params))


def _assert_close(got, want, tol=TOL):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = max(float(np.max(np.abs(b))), 1.0)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


def _active(carries, cell):
    """Fractions of (step, neuron) with a spike and inside the pseudo-derivative's support."""
    threshold = cell.threshold + (cell.beta * carries.a if hasattr(carries, "a") else 0.0)
    psi = pseudo_derivative(carries.v, threshold, cell.threshold, cell.dampening)
    return float(np.mean(carries.z)), float(np.mean(psi > 0))


CELLS = {
    "lif": lambda: rtrl_jax.LIFCell(4),
    "alif": lambda: rtrl_jax.ALIFCell(
        4, beta=0.5, tau_adaptation=30.0, refractory=2, detach_reset=False, self_connections=False
    ),
}
# The default run checks ALIF (adaptation, refractoriness, the reset's gradient); LIF behind ``slow``.
NAMES = [pytest.param("lif", marks=pytest.mark.slow), "alif"]


@pytest.mark.parametrize("name", NAMES)
def test_exact_rtrl_through_spiking_cells_equals_bptt(name):
    cell = CELLS[name]()
    core, params, carry, xs, weights = _problem(cell)
    got, carries = _online(core, rtrl_jax.rtrl(core), params, carry, xs, weights, _carry_loss)
    spiking, in_support = _active(carries, cell)
    assert 0.05 < spiking < 0.8 and in_support > 0.1, (spiking, in_support)
    _assert_close(got, _bptt(core, params, carry, xs, weights, _carry_loss))


@pytest.mark.parametrize("name", NAMES)
def test_eprop_is_exact_without_recurrent_coupling(name):
    """W_rec = 0: every neuron evolves on its own, and e-prop drops nothing (Bellec et al. 2020)."""
    cell = CELLS[name]()
    core, params, carry, xs, weights = _problem(cell, recurrent_scale=0.0)
    got, _ = _online(core, rtrl_jax.eprop(core), params, carry, xs, weights, _carry_loss)
    exact, _ = _online(core, rtrl_jax.rtrl(core), params, carry, xs, weights, _carry_loss)
    assert max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(exact)) > 1e-2
    _assert_close(got, exact)


def bellec_eprop(cell, params, xs, learning_signals):
    """Bellec et al. 2020 (Methods), in NumPy: per-step e-prop gradients ``Σ_j L^t_j e^t_ji`` of
    the input and recurrent weights of LIF (``β = 0``) and ALIF neurons from a zero state, with

        ε^v_{t+1} = α ε^v_t + (x^{t+1}_i or z^t_i),   ε^a_{t+1} = ψ^t_j ε^v_t + (ρ − ψ^t_j β) ε^a_t,
        e^{t+1}_ji = ψ^{t+1}_j (ε^v_{t+1} − β ε^a_{t+1}),

    ``ψ = (γ/v_th) max(0, 1 − |v − A|/v_th)``, zero while refractory; autapses disconnected.
    """
    alpha = np.exp(-1.0 / cell.tau)
    adaptive = isinstance(cell, rtrl_jax.ALIFCell)
    rho = np.exp(-1.0 / cell.tau_adaptation) if adaptive else 0.0
    beta = cell.beta if adaptive else 0.0
    v_th, gamma, k = cell.threshold, cell.dampening, cell.refractory
    w_in = np.asarray(params["input"]["kernel"])
    w_rec = np.asarray(params["recurrent"]["kernel"]) * (1.0 - np.eye(cell.features))
    n = cell.features
    v, a, z, psi = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    last_spikes = [np.zeros(n)] * k
    eps = {name: (np.zeros((m, n)), np.zeros((m, n))) for name, m in (("input", INPUT), ("recurrent", n))}
    grads = {"input": [], "recurrent": []}
    for x, signal in zip(np.asarray(xs), np.asarray(learning_signals), strict=True):
        new_v = alpha * v + x @ w_in + z @ w_rec - z * v_th
        new_a = rho * a + z
        threshold = v_th + beta * new_a
        refractory = np.any(np.asarray(last_spikes) > 0, axis=0) if k else np.zeros(n, bool)
        new_z = np.where(refractory, 0.0, (new_v > threshold).astype(float))
        new_psi = np.where(
            refractory, 0.0, gamma / v_th * np.maximum(0.0, 1.0 - np.abs(new_v - threshold) / v_th)
        )
        for name, pre in (("input", x), ("recurrent", z)):
            eps_v, eps_a = eps[name]
            eps_a = psi[None, :] * eps_v + (rho - psi[None, :] * beta) * eps_a  # uses ψ^t, ε^v_t
            eps_v = alpha * eps_v + pre[:, None]
            eps[name] = (eps_v, eps_a)
            e = new_psi[None, :] * (eps_v - beta * eps_a)
            if name == "recurrent":
                e = e * (1.0 - np.eye(n))
            grads[name].append(signal[None, :] * e)
        v, a, z, psi = new_v, new_a, new_z, new_psi
        last_spikes = ([z] + last_spikes)[:k]
    return {name: {"kernel": np.stack(g)} for name, g in grads.items()}


@pytest.mark.parametrize(
    "cell",
    [
        pytest.param(rtrl_jax.LIFCell(4, self_connections=False), marks=pytest.mark.slow),
        rtrl_jax.ALIFCell(4, beta=0.5, tau_adaptation=30.0, refractory=2, self_connections=False),
    ],
    ids=["lif", "alif"],
)
def test_eprop_equals_bellec_eligibility_traces(cell):
    core, params, carry, xs, weights = _problem(cell, recurrent_scale=2.0)
    got, carries = _online(core, rtrl_jax.eprop(core), params, carry, xs, weights, _spike_loss)
    spiking, in_support = _active(carries, cell)
    assert 0.05 < spiking < 0.8 and in_support > 0.1, (spiking, in_support)
    want = bellec_eprop(cell, params, xs, weights["z"])
    np.testing.assert_array_equal(carries.z, np.asarray(carries.z) > 0)  # spikes, 0 or 1
    _assert_close(got, want)
    # e-prop is not BPTT here: the recurrent coupling matters
    bptt = _bptt(core, params, carry, xs, weights, _spike_loss)
    assert (
        max(np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(bptt), strict=True))
        > 1e-3
    )


def test_spiking_cells_run_under_nn_rnn_as_the_core():
    cell = rtrl_jax.ALIFCell(5, refractory=3)
    xs = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 40, INPUT), jnp.float32)
    core = rtrl_jax.from_linen(cell, INPUT)
    params, carry = core.init(jax.random.PRNGKey(1))
    spikes = nn.RNN(cell).apply({"params": {"cell": params}}, xs)
    assert spikes.shape == (2, 40, 5)
    assert isinstance(carry, ALIFState) and carry.recent.shape == (3, 5)
    _, outs = jax.lax.scan(lambda h, x: core(params, h, x), carry, xs[0])
    np.testing.assert_array_equal(outs, spikes[0])
    assert 0 < float(jnp.mean(spikes)) < 0.25
    # refractory: no neuron spikes twice within 3 steps
    z = np.asarray(spikes)
    for lag in (1, 2, 3):
        assert not np.any(z[:, lag:] * z[:, :-lag])
    lif = rtrl_jax.LIFCell(3)
    assert isinstance(lif.initialize_carry(None, (7, INPUT)), LIFState)
    assert lif.initialize_carry(None, (7, INPUT)).v.shape == (7, 3) and lif.num_feature_axes == 1


def test_neurons_are_eprops_units_and_the_registry_entry():
    core = rtrl_jax.from_linen(rtrl_jax.ALIFCell(3, refractory=2), 2)
    units = neuron_units(core)
    v, a, z, recent = units[:3], units[3:6], units[6:9], units[9:]
    np.testing.assert_array_equal(v, a)
    np.testing.assert_array_equal(v, z)
    assert len(set(v.tolist())) == 3 and not set(recent.tolist()) & set(v.tolist())
    # the refractory buffer keeps no trace; every synapse keeps (ε^v, ε^a, e)
    layout = rtrl_jax.snap_layout(core, 1, units=units)
    assert layout.rows.size == 3 * (2 * 3 + 3 * 3)
    # a leaky rate network: every unit is its own neuron, and e-prop is SnAp-1
    leaky = rtrl_jax.from_linen(rtrl_jax.LeakyRNNCell(3), 2)
    np.testing.assert_array_equal(np.sort(neuron_units(leaky)), np.arange(3))

    info = rtrl_jax.get_estimator_info("eprop")
    assert not info.needs_key and info.unsupported_reason(core) is None
    assert not rtrl_jax.is_exact("eprop", core)  # the neurons are coupled through W_rec
    assert "eprop" in rtrl_jax.estimators_for(core)
    with pytest.raises(ValueError, match="cannot serve"):
        rtrl_jax.make_estimator("eprop", lambda p, c, x: (c, c))
