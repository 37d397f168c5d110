"""Bad inputs a new user hits get one clear line naming the value; a run records what it used."""

import json
import os
import re
import signal
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rtrl_jax as rj
from rtrl_jax._src import tasks
from rtrl_jax._src.trainer import StepMetrics, init_train_state, linear_head, train_online
from rtrl_jax.cli import build_parser, main
from rtrl_jax.experiment import (
    Checkpointer,
    CheckpointWarning,
    ConfigError,
    build,
    load_config,
    plot_run,
    run_training,
)
from rtrl_jax.experiment.run import metric_rows, write_metrics

SMALL = ["task=add", "model.hidden=4", "train.batch_size=2", "train.steps=20", "train.chunk_size=10"]


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "f"
    path.write_text("x\n")
    assert main(["train", "--quiet", "--out", str(path), *SMALL]) == 2
    assert f"run folder {str(path)!r} is a file, not a folder" in capsys.readouterr().err
    assert path.read_text() == "x\n"


@pytest.mark.parametrize("value", ["nan", "inf", ".nan", "-.inf"])
def test_non_finite_learning_rate_is_refused(value):
    with pytest.raises(ConfigError, match=r"train.learning_rate: expected a finite number, got -?(nan|inf)"):
        load_config(None, [f"train.learning_rate={value}"])


def test_a_head_for_the_wrong_input_size_names_both_sizes():
    task = tasks.add_task()
    core = rj.from_linen(nn.GRUCell(4), task.input_size)
    est = rj.make_estimator("uoro", core)
    params, _ = core.init(jax.random.PRNGKey(0), jnp.float32)
    head_params = linear_head().init(jax.random.PRNGKey(1), 7, task.num_classes)  # 7, not 4
    state = init_train_state(
        core, est, optax.sgd(0.1), params, head_params, batch_size=1, key=jax.random.PRNGKey(2)
    )
    stream = tasks.sample_batch(task, jax.random.PRNGKey(3), 5, 1)
    with pytest.raises(
        ValueError, match=r"output of shape \(4,\): head parameters .*7.*build the head for 4"
    ):
        train_online(core, est, optax.sgd(0.1), stream, state)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (
            ["task=char"],
            r"task_options: task 'char': missing option\(s\) \['path'\]; its options: path \(required\)",
        ),
        (
            ["task=copy", "task_options.path=x"],
            r"task 'copy': unknown option\(s\) \['path'\].*length=5, num_symbols=2",
        ),
    ],
)
def test_task_options_list_the_valid_ones(overrides, named):
    with pytest.raises(ConfigError, match=named):
        build(load_config(None, overrides))


def test_resume_of_a_finished_run_keeps_its_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), *SMALL]) == 0
    before = (out / "summary.json").read_text()
    assert json.loads(before)["status"] == "finished"
    capsys.readouterr()
    assert main(["train", "--quiet", "--resume", str(out)]) == 2
    assert "is finished (20 steps); there is nothing to resume" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before


def test_summary_records_the_options_used_and_versions(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), *SMALL, "estimator=tbptt"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    window = rj.estimator_options("tbptt")["window"]
    assert summary["estimator_options"]["window"] == window
    assert set(summary["versions"]) == {"jax", "jaxlib", "flax", "optax", "numpy", "rtrl_jax"}
    assert summary["versions"]["jax"] == jax.__version__ and summary["versions"]["rtrl_jax"]


def test_char_task_records_its_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("text.txt").write_text("abcabcabd " * 30)
    config = load_config(None, ["task=char", "task_options.path=text.txt", *SMALL[1:]])
    built = build(config)
    assert built.spec.task_options["path"] == str(tmp_path / "text.txt")


class _State(NamedTuple):
    step: jax.Array
    w: jax.Array


def test_corrupt_checkpoint_warning_is_one_line(tmp_path):
    state = _State(jnp.array(3), jnp.ones(4))
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(state)
    for path in (tmp_path / "checkpoints" / "3").rglob("*"):
        if path.is_file() and "d" in path.parent.name:
            path.write_bytes(b"\0" * 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert checkpointer.restore_latest(like=state) is None
    checkpointer.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert messages and all("\n" not in m and len(m) < 400 for m in messages), messages


def test_help_has_no_rest_markup():
    text = build_parser().format_help()
    assert "``" not in text and ":mod:" not in text and "`" not in text


@pytest.mark.parametrize("name", ["rtrl", "uoro", "tbptt"])
def test_a_wrong_shape_cotangent_names_both_shapes(name):
    core = rj.from_linen(nn.GRUCell(8), 3)
    params, carry = core.init(jax.random.PRNGKey(0))
    est = rj.make_estimator(name, core)
    trace = est.init(params, carry, key=jax.random.PRNGKey(1))
    named = r"carry_bar has shape\(s\) \[\(5,\)\], but the core's carry has \[\(8,\)\]"
    with pytest.raises(ValueError, match=named):
        est.grad(trace, params, jnp.ones(5))


def _png_height(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[20:24])[0]


@pytest.mark.parametrize("hard_targets, panels", [(False, 2), (True, 3)])
def test_soft_targets_record_no_accuracy_and_plot_no_accuracy_panel(tmp_path, hard_targets, panels):
    assert not rj.add_task().hard_targets and rj.copy_task().hard_targets
    ones = np.ones(4)
    metrics = StepMetrics(
        loss=ones, weight=2 * ones, correct=ones, grad_norm=ones, nonfinite=np.zeros(4, int)
    )
    rows = metric_rows(metrics, 0, hard_targets=hard_targets)
    assert [row["accuracy"] for row in rows] == [0.5 if hard_targets else None] * 4
    write_metrics(tmp_path, rows, fresh=True)
    assert _png_height(plot_run(tmp_path)) == round(panels * 2.4 * 110)  # 2.4 inches a panel, 110 dpi


@pytest.mark.slow
def test_progress_bar_shows_the_runs_rate_and_a_resume_starts_at_its_step(tmp_path, capsys):
    """The bar shows the run's steps/s only and, on --resume, starts at the restored step; the add
    task (soft targets) records no accuracy."""
    out = tmp_path / "cut"

    def interrupt(steps_done, info):
        if steps_done == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    assert run_training(build(load_config(None, SMALL)), out, on_chunk=interrupt)["status"] == "interrupted"
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    bar = capsys.readouterr().err
    frames = [frame for frame in re.split(r"[\r\n]", bar) if "/20" in frame]
    assert frames and frames[0].lstrip().startswith("50%") and "10/20" in frames[0], frames
    assert "20/20" in frames[-1] and "loss=" in frames[-1]
    assert not re.search(r"(step|it)/s[^=]", bar) and "<" not in bar, bar  # no tqdm rate, no time left
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 21))
    assert all(row["accuracy"] is None for row in rows)
