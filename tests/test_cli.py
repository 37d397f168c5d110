"""The command line and its configuration: runs, run folders, and rejected input."""

import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml

import rtrl_jax as rj
from rtrl_jax.cli import main
from rtrl_jax.experiment import (
    ConfigError,
    RunConfig,
    build,
    load_config,
    restore_final_state,
    run_training,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_train_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["train", "--quiet", "--out", str(out), "model.hidden=8", "train.steps=300", "train.chunk_size=100"]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 300 and summary["estimator"] == "rtrl" and summary["cell"] == "gru"
    assert {"final_loss", "final_accuracy", "steps_per_s", "device", "jax_version"} <= set(summary)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 301))
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["hidden"] == 8 and resolved["train"]["steps"] == 300
    assert "run folder" in capsys.readouterr().out


def test_shipped_configs_are_valid():
    # compare_*.yaml and bench_*.yaml have their own schemas (test_compare.py, test_benchmarks_learning.py)
    paths = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("compare_", "bench_")))
    assert paths
    for path in paths:
        build(load_config(path))


def test_default_config_file_is_the_embedded_default():
    assert load_config(CONFIGS / "copy_gru_rtrl.yaml") == load_config(
        None, ["task_options.length=5", "task_options.num_symbols=2"]
    )
    assert to_dict(load_config()) == to_dict(RunConfig())


def test_overrides_are_typed():
    config = load_config(None, ["estimator=tbptt", "estimator_options.window=4", "train.learning_rate=1e-2"])
    assert config.estimator == "tbptt" and config.estimator_options == {"window": 4}
    assert config.train.learning_rate == pytest.approx(1e-2)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.stepz=10"], "'train.stepz'"),
        (["model.hidden=abc"], "model.hidden"),
        (["model.hidden=-3"], "model.hidden"),
        (["train.learning_rate=-0.1"], "train.learning_rate"),
        (["train.batch_size=0"], "train.batch_size"),
        (["estimator=rtlr"], "'rtlr'"),
        (["model.cell=transformer"], "'transformer'"),
        (["task=sorting"], "'sorting'"),
        (["train.optimizer=adamax2"], "'adamax2'"),
        (["model.dtype=float16"], "'float16'"),
        (["estimator_options.rank=2"], "'rank'"),
        (["estimator=tbptt", "estimator_options.window=0"], "window"),
        (["task_options.t1=3"], "'t1'"),
        (["task_options.length=0"], "length"),
        (["train.steps"], "key=value"),
    ],
)
def test_invalid_config_values_are_rejected_with_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named):
        build(load_config(None, overrides))


def test_cli_reports_invalid_config_without_a_traceback(capsys):
    assert main(["train", "--quiet", "train.steps=-1"]) == 2
    assert "invalid configuration: train.steps: must be > 0" in capsys.readouterr().err


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_estimators_lists_names_and_cells(capsys):
    assert main(["estimators"]) == 0
    text = capsys.readouterr().out
    assert "rtrl" in text and "tbptt" in text and "cells: simple, gru, lstm" in text


def test_library_cells_train_from_the_command_line(tmp_path):
    # the complex LRU's output is [Re h, Im h], twice the hidden size: the readout follows the core
    out = tmp_path / "lru"
    args = ["model.cell=lru", "model.hidden=4", "estimator=snap", "task=add", "train.steps=60"]
    assert main(["train", "--quiet", "--out", str(out), *args]) == 0
    assert json.loads((out / "summary.json").read_text())["cell"] == "lru"


def _zero(core, scale=0.0):
    """An estimator that keeps no trace and gives ``scale`` times a zero gradient."""
    return rj.Estimator(
        init=lambda params, carry, *, key=None: (),
        step=lambda trace, params, carry, x, *, key=None: (*core(params, carry, x), ()),
        grad=lambda trace, params, carry_bar: jax.tree.map(lambda p: scale * jnp.zeros_like(p), params),
    )


def test_an_estimator_registered_at_runtime_is_listed_validated_and_trained(tmp_path, capsys):
    def no_lstm(core):
        return "no LSTM" if core.name == "lstm" else None

    rj.register("zero_test", _zero, summary="zero gradient (a test estimator)", unsupported_reason=no_lstm)
    try:
        assert main(["estimators"]) == 0
        lines = capsys.readouterr().out.splitlines()
        row = lines.index(next(line for line in lines if line.startswith("zero_test ")))
        assert "zero gradient (a test estimator)" in lines[row]
        assert "cells: simple, gru, optimized_lstm" in lines[row + 1]
        with pytest.raises(ConfigError, match="estimator_options.*'rank'"):
            build(load_config(None, ["estimator=zero_test", "estimator_options.rank=2"]))
        with pytest.raises(ConfigError, match="estimator: .*'zero_test' cannot serve core 'lstm': no LSTM"):
            build(load_config(None, ["estimator=zero_test", "model.cell=lstm"]))
        args = ["estimator=zero_test", "task=add", "model.hidden=4", "train.steps=20", "train.chunk_size=10"]
        assert main(["train", "--quiet", "--out", str(tmp_path / "zero"), *args]) == 0
        assert json.loads((tmp_path / "zero" / "summary.json").read_text())["estimator"] == "zero_test"
    finally:
        rj.unregister("zero_test")
    with pytest.raises(ConfigError, match="unknown estimator 'zero_test'"):
        build(load_config(None, ["estimator=zero_test"]))


# ---------------------------------------------------------------- whole models (model.layers > 1)

TWO_LAYERS = [
    "task=add",
    "model.layers=2",
    "model.cell=simple",
    "model.hidden=4",
    "model.layer_estimators=[snap,uoro]",
    "model.embedding=3",
    "model.head=mlp",
    "model.norm=layer",
    "train.batch_size=2",
    "train.steps=40",
    "train.chunk_size=10",
    "train.checkpoint_every=20",
    "train.update_every=2",
]


def test_one_layer_is_the_core_and_head_run():
    assert build(load_config(None, ["model.hidden=4"])).model is None
    assert build(load_config(None, ["model.hidden=4", "model.layers=1"])).model is None


def test_layers_take_the_run_estimator_and_its_options_unless_given_their_own():
    overrides = ["task=add", "model.hidden=4", "model.layers=2", "model.layer_estimators=[tbptt,rtrl]"]
    experiment = build(load_config(None, [*overrides, "estimator=tbptt", "estimator_options.window=3"]))
    assert [(layer.estimator, layer.options) for layer in experiment.layers] == [
        ("tbptt", {"window": 3}),
        ("rtrl", {}),
    ]


def test_a_stack_with_one_trace_is_one_layer_over_every_cell_and_norm():
    overrides = ["task=add", "model.layers=2", "model.hidden=4", "model.traces=stack", "model.norm=layer"]
    experiment = build(load_config(None, overrides))
    assert [(layer.cell, layer.estimator) for layer in experiment.layers] == [("stack(gru/4,gru/4)", "rtrl")]
    params = experiment.state.params
    assert set(params) == {"rnn0", "norm0", "head"}  # the norm after the top layer is outside the core
    assert set(params["rnn0"]["core"]) == {"layers_0", "layers_1", "layers_2"}  # gru, norm, gru


def test_two_layer_model_trains_and_an_interrupted_run_resumes_bitwise(tmp_path, capsys):
    full = tmp_path / "full"
    assert main(["train", "--quiet", "--out", str(full), *TWO_LAYERS]) == 0
    assert "layers=2 (simple/4/snap simple/4/uoro)" in capsys.readouterr().out
    summary = json.loads((full / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 40
    assert [(layer["estimator"], layer["input_size"]) for layer in summary["layers"]] == [
        ("snap", 3),
        ("uoro", 4),
    ]

    experiment = build(load_config(full / "config.yaml"))
    cut = tmp_path / "cut"

    def interrupt(steps_done, info):
        if steps_done == 30:
            os.kill(os.getpid(), signal.SIGTERM)

    assert run_training(experiment, cut, on_chunk=interrupt)["status"] == "interrupted"
    assert main(["train", "--quiet", "--resume", str(cut)]) == 0  # the same compiled chunk throughout
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed_from"] == 30
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    reference, restored = restore_final_state(full), restore_final_state(cut)
    assert type(restored).__name__ == "ModelTrainState"
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(restored), strict=True):
        assert jnp.array_equal(a, b)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["model.layers=0"], "model.layers: must be > 0"),
        (["model.layers=2", "model.layer_cells=gru"], "model.layer_cells: expected list"),
        (["model.layers=2", "model.layer_estimators=[snap]"], "model.layer_estimators: expected 2 entries"),
        (["model.layers=2", "model.layer_cells=[gru,rnn]"], r"model.layer_cells\[1\]: unknown cell 'rnn'"),
        (["model.layers=2", "model.layer_hidden=[4,0]"], r"model.layer_hidden\[1\]: expected a positive"),
        (
            ["model.layers=2", "model.layer_estimators=[rtrl,rtlr]"],
            r"layer_estimators\[1\]: unknown estimator",
        ),
        (
            ["model.layers=2", "model.layer_cells=[gru,optimized_lstm]", "model.layer_estimators=[rtrl,kf]"],
            r"model.layer_estimators\[1\]: layer 1 \(rnn1\): estimator 'kf' cannot serve core 'optimized",
        ),
        (
            ["model.layers=2", "model.cell=optimized_lstm", "estimator=kf"],
            r"estimator: layer 0 \(rnn0\): estimator 'kf' cannot serve",
        ),
        (["model.layers=2", "model.layer_estimator_options=[{rank: 2}, {}]"], r"options\[0\]: .*'rank'"),
        (["model.layers=2", "model.layer_estimator_options=[3, {}]"], r"options\[0\]: expected a mapping"),
        (["model.layers=2", "estimator_options.rank=2"], r"estimator_options: online layer 'rnn0'.*'rank'"),
        (["model.head=conv"], "model.head: unknown head 'conv'"),
        (["model.head_hidden=-1"], "model.head_hidden: must be >= 0"),
        (["model.norm=batch"], "model.norm: unknown norm 'batch'"),
        (["model.embedding=-1"], "model.embedding: must be >= 0"),
        (["model.residual=1"], "model.residual: expected bool"),
        (["model.traces=stacked"], "model.traces: unknown trace layout 'stacked'"),
        (
            ["model.layers=2", "model.traces=stack", "model.layer_estimators=[snap,rtrl]"],
            "model.layer_estimators: .* needs model.traces=per_layer",
        ),
        (["model.layers=2", "model.traces=stack", "model.residual=true"], "model.residual: .*per_layer"),
        (
            ["model.layers=2", "model.layer_hidden=[4,8]", "model.residual=true"],
            r"model.residual: layer 1 \(rnn1\) maps 4 features to 8",
        ),
    ],
)
def test_invalid_model_values_name_the_key_and_the_layer(overrides, named):
    with pytest.raises(ConfigError, match=named):
        build(load_config(None, overrides))
