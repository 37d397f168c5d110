"""Memory before allocation: trace bytes from shapes, the run's estimate, the budget refusal."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import rtrl_jax as rj
from rtrl_jax._src import snap, tasks
from rtrl_jax._src.memory import format_bytes, tree_bytes
from rtrl_jax._src.trainer import init_train_state, linear_head, make_train_step
from rtrl_jax.cli import main
from rtrl_jax.experiment import ConfigError, build, load_config, names
from rtrl_jax.experiment.build import PEAK_STATES


def test_trace_bytes_is_the_allocated_trace_and_allocates_nothing():
    core = rj.from_linen(nn.GRUCell(5), 3)
    params, carry = core.init(jax.random.PRNGKey(0))
    est = rj.make_estimator("rtrl", core)
    trace = est.init(params, carry)
    assert rj.trace_bytes(est, params, carry) == tree_bytes(trace)
    assert rj.trace_bytes(est, params, carry, batch_size=4) == 4 * tree_bytes(trace)
    # exact RTRL's influence matrix: S x P floats
    assert tree_bytes(trace) >= 5 * rj.tree_size(params) * 4


@pytest.mark.parametrize(
    "text, expected", [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1e9", 10**9), (1024, 1024)]
)
def test_parse_bytes(text, expected):
    assert rj.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "8 parsecs", 0])
def test_parse_bytes_names_the_bad_value(text):
    with pytest.raises(ValueError, match=f"{text!r} is not a memory size"):
        rj.parse_bytes(text)


@pytest.mark.parametrize("hidden", [8, 24])
@pytest.mark.parametrize(
    "name",
    [
        name if name in ("rtrl", "uoro", "tbptt") else pytest.param(name, marks=pytest.mark.slow)
        for name in (info.name for info in rj.registered())
    ],
)
def test_estimate_is_within_2x_of_xla_memory_analysis(name, hidden):
    task = tasks.add_task()
    core = rj.from_linen(nn.GRUCell(hidden), task.input_size)
    est = rj.make_estimator(name, core, **rj.get_estimator_info(name).example_options)
    params, _ = core.init(jax.random.PRNGKey(0), jnp.float32)
    head_params = linear_head().init(jax.random.PRNGKey(1), hidden, task.num_classes)
    optimizer = optax.adam(1e-3)
    state = init_train_state(
        core, est, optimizer, params, head_params, batch_size=4, key=jax.random.PRNGKey(2)
    )
    batch = jax.tree.map(lambda a: a[:, 0], tasks.task_source(task, jax.random.PRNGKey(3), 4).chunk(0, 1))
    compiled = jax.jit(make_train_step(core, est, optimizer)).lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no memory analysis")
    peak = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    estimate = PEAK_STATES * tree_bytes(state)
    assert peak / 2 <= estimate <= 2 * peak, (name, hidden, estimate, peak)


def test_run_estimate_matches_the_built_state():
    built = build(load_config(None, ["task=add", "model.hidden=6", "train.steps=10", "estimator=uoro"]))
    assert built.memory.state_bytes == tree_bytes(built.state)
    assert built.memory.trace_bytes == tree_bytes(built.state.trace)
    assert built.memory.peak_bytes == PEAK_STATES * built.memory.state_bytes
    model = build(load_config(None, ["task=add", "model.layers=2", "model.hidden=4", "train.steps=10"]))
    assert model.memory.state_bytes == tree_bytes(model.state)
    assert 0 < model.memory.trace_bytes < model.memory.state_bytes


def test_over_budget_refuses_before_allocating_and_names_what_fits():
    with pytest.raises(
        ConfigError, match=r"train.max_memory: the run needs about .* but train.max_memory is"
    ) as info:
        build(load_config(None, ["model.hidden=64", "train.max_memory=2MB"]))
    assert "Estimators that would fit:" in str(info.value) and "uoro (~" in str(info.value)
    with pytest.raises(ConfigError, match="train.max_memory: 'lots' is not a memory size"):
        build(load_config(None, ["train.max_memory=lots"]))
    assert build(load_config(None, ["train.steps=10", "train.max_memory=none"])).memory.budget_bytes is None


def test_cli_prints_the_estimate(tmp_path, capsys):
    args = ["task=add", "model.hidden=4", "train.steps=20", "train.chunk_size=10", "train.batch_size=2"]
    assert main(["train", "--quiet", "--out", str(tmp_path / "run"), *args]) == 0
    assert "memory: peak of a step ~" in capsys.readouterr().out


def test_hidden_2048_exact_rtrl_is_refused_without_compiling(tmp_path):
    """The influence matrix of a 2048-unit GRU is tens of GiB: refused with a message, exit 2."""
    code = (
        "import sys; from rtrl_jax.cli import main;"
        f"sys.exit(main(['train', '--quiet', '--out', {str(tmp_path / 'big')!r}, 'model.hidden=2048',"
        " 'train.max_memory=16GiB']))"
    )
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.max_memory: the run needs about" in done.stderr
    assert "Estimators that would fit:" in done.stderr and "uoro" in done.stderr
    assert "train_chunk" not in done.stderr and "train_step" not in done.stderr  # nothing of the run compiled
    assert not (tmp_path / "big").exists()


class _RecordingGRU(nn.GRUCell):
    """A GRU that records the input shape of every call made on concrete arrays (an
    initialisation or a probe of the cell's values) in ``CONCRETE``; abstract traces are not
    recorded."""

    def __call__(self, carry, inputs):
        if not isinstance(inputs, jax.core.Tracer):
            _RecordingGRU.CONCRETE.append(inputs.shape)
        return super().__call__(carry, inputs)


_RecordingGRU.CONCRETE = []


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.setattr(_RecordingGRU, "CONCRETE", [])
    monkeypatch.setitem(names.CELLS, "gru", lambda hidden: _RecordingGRU(features=hidden))
    return _RecordingGRU


def test_from_linen_builds_the_core_from_shapes_only(recorded):
    core = rj.from_linen(recorded(7), 3)
    assert recorded.CONCRETE == []  # specs and output map from abstract traces
    params, carry = core.init(jax.random.PRNGKey(0))  # the cell's own initialisation is concrete
    assert recorded.CONCRETE == [(3,)]
    assert core.params_spec == jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    assert core.carry_spec == jax.ShapeDtypeStruct((7,), jnp.float32)
    new_carry, out = core(params, carry, jnp.ones(3))
    assert jnp.array_equal(core.output(new_carry), out)


def test_from_linen_reads_the_output_leaf_of_a_tuple_carry():
    core = rj.from_linen(nn.LSTMCell(4), 2)
    params, carry = core.init(jax.random.PRNGKey(0))
    (c, h), out = core(params, jax.tree.map(lambda a: a + 0.3, carry), jnp.ones(2))
    assert jnp.array_equal(core.output((c, h)), out) and jnp.array_equal(out, h)
    assert not jnp.array_equal(c, h)


class _CopiedOutputCell(nn.SimpleCell):
    """A cell whose output equals its new carry in value but is another array (a concrete probe
    is needed to match it to the carry)."""

    def __call__(self, carry, inputs):
        new_carry, out = super().__call__(carry, inputs)
        return new_carry, out * 1.0


def test_from_linen_probes_a_cell_whose_output_is_a_value_of_its_own():
    core = rj.from_linen(_CopiedOutputCell(4), 2)
    params, carry = core.init(jax.random.PRNGKey(0))
    new_carry, out = core(params, carry, jnp.ones(2))
    assert jnp.array_equal(core.output(new_carry), out)


def test_a_refused_run_never_initialises_the_model(recorded, monkeypatch):
    """The estimate and the refusal of exact RTRL on a large GRU cost shapes only: no call of the
    cell on concrete arrays (neither its initialisation nor an output probe), and no sparsity probe
    of the large core (its probe points are arrays of the parameters' size)."""
    probed = []
    probe = snap._probe_patterns
    monkeypatch.setattr(
        snap, "_probe_patterns", lambda core, *a: probed.append(core.carry_size) or probe(core, *a)
    )
    with pytest.raises(
        ConfigError, match=r"train.max_memory: the run needs about .* but train.max_memory is"
    ):
        build(load_config(None, ["model.hidden=256", "train.max_memory=64MB"]))
    assert recorded.CONCRETE == [] and 256 not in probed
    small = build(load_config(None, ["model.hidden=4", "train.steps=10", "estimator=snap"]))
    assert small.core.name == "gru" and recorded.CONCRETE and 4 in probed  # the recorders record


def test_format_bytes():
    assert format_bytes(34359738368) == "32.0 GiB" and format_bytes(12) == "12 B"
