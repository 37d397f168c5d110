"""Reliability: non-finite guards, checkpoints, interrupt and resume (bitwise), plots, rejected input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rtrl_jax as rj
from rtrl_jax._src import tasks
from rtrl_jax._src.trainer import (
    NonFiniteError,
    init_train_state,
    linear_head,
    nonfinite_names,
    train_online,
)
from rtrl_jax.cli import main
from rtrl_jax.experiment import (
    CheckpointWarning,
    ConfigError,
    build,
    load_config,
    restore_final_state,
    run_training,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["task=add", "model.hidden=4", "train.batch_size=2", "train.steps=60", "train.chunk_size=10"]


def _assert_same_leaves(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- non-finite guards


def _poisoned_setup(estimator="uoro"):
    task = tasks.add_task()
    core = rj.from_linen(nn.GRUCell(4), task.input_size)
    est = rj.make_estimator(estimator, core)
    key_core, key_head, key_data, key_state = jax.random.split(jax.random.PRNGKey(0), 4)
    params, _ = core.init(key_core, jnp.float32)
    head_params = linear_head().init(key_head, 4, task.num_classes)
    optimizer = optax.sgd(0.1)
    state = init_train_state(core, est, optimizer, params, head_params, batch_size=2, key=key_state)
    stream = tasks.sample_batch(task, key_data, 30, 2)
    poisoned = stream._replace(inputs=stream.inputs.at[1, 12, 0].set(jnp.nan))
    return core, est, optimizer, state, stream, poisoned


def test_poisoned_input_is_skipped_and_counted():
    core, est, optimizer, state, _, poisoned = _poisoned_setup()
    final, metrics = train_online(core, est, optimizer, poisoned, state, chunk_size=10)
    assert int(final.step) == 30
    assert np.flatnonzero(metrics.nonfinite).tolist() == [12]
    assert {"loss", "carry", "trace"} <= set(nonfinite_names(metrics.nonfinite[12]))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(final.params))
    assert np.isfinite(metrics.loss[13:]).all()
    ignored, _ = train_online(core, est, optimizer, poisoned, state, chunk_size=10, nonfinite="ignore")
    assert not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(ignored.params))


def test_poisoned_input_stops_the_run_under_stop():
    core, est, optimizer, state, _, poisoned = _poisoned_setup()
    with pytest.raises(NonFiniteError, match="non-finite loss.*at step 13") as info:
        train_online(core, est, optimizer, poisoned, state, chunk_size=10, nonfinite="stop")
    error = info.value
    assert error.step == 13 and "loss" in error.quantities
    assert int(error.state.step) == 13 and error.metrics.loss.shape == (13,)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(error.state.params))


def test_finite_runs_are_unchanged_by_the_guard():
    core, est, optimizer, state, stream, _ = _poisoned_setup()
    guarded, _ = train_online(core, est, optimizer, stream, state, chunk_size=10)
    unguarded, _ = train_online(core, est, optimizer, stream, state, chunk_size=10, nonfinite="ignore")
    _assert_same_leaves(guarded, unguarded)


def test_huge_learning_rate_goes_on_under_skip_and_stops_under_stop(tmp_path, capsys):
    args = [*SMALL, "train.steps=40", "train.optimizer=sgd", "train.learning_rate=1e30"]
    assert main(["train", "--quiet", "--out", str(tmp_path / "skip"), *args]) == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "finished" and summary["steps"] == 40
    assert summary["nonfinite_steps"] >= 1 and summary["nonfinite_events"][0]["quantities"]
    assert sum(1 for r in rows if r["nonfinite"]) == summary["nonfinite_steps"]
    assert main(["train", "--quiet", "--out", str(tmp_path / "stop"), *args, "train.nonfinite=stop"]) == 3
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["status"] == "stopped_nonfinite" and summary["steps"] == summary["stop"]["step"] < 40
    assert f"at step {summary['steps']}" in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints and resume


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted kf run with checkpoints every 20 steps (and its built experiment)."""
    experiment = build(load_config(None, [*SMALL, "estimator=kf", "train.checkpoint_every=20"]))
    out = tmp_path_factory.mktemp("full") / "run"
    summary = run_training(experiment, out)
    assert summary["status"] == "finished"
    return experiment, out, restore_final_state(out)


def test_interrupted_run_resumes_bitwise(full_run, tmp_path):
    experiment, _, reference = full_run
    out = tmp_path / "cut"

    def interrupt(steps_done, info):
        if steps_done == 30:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = run_training(experiment, out, on_chunk=interrupt)
    assert summary["status"] == "interrupted" and summary["steps"] == 30
    assert summary["interrupt"] == {"signal": "SIGTERM"}
    resumed = run_training(experiment, out, resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_from"] == 30
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    _assert_same_leaves(restore_final_state(out), reference)


def test_corrupt_checkpoint_falls_back_to_the_previous(full_run, tmp_path):
    experiment, source, reference = full_run
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    checkpoints = out / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [20, 40, 60]
    for path in (checkpoints / "60").rglob("*"):  # damage every data file of the newest one
        if path.is_file() and "d" in path.parent.name:
            path.write_bytes(b"\0" * 7)
    (checkpoints / "80.orbax-checkpoint-tmp-1").mkdir()  # an unfinished write
    with pytest.warns(CheckpointWarning, match="step 60"):
        summary = run_training(experiment, out, resume=True)
    assert summary["resumed_from"] == 40 and summary["steps"] == 60
    assert (out / "corrupt_checkpoints" / "60").is_dir()
    _assert_same_leaves(restore_final_state(out), reference)


def test_fresh_run_refuses_a_folder_with_checkpoints(full_run, capsys):
    _, out, _ = full_run
    assert main(["train", "--quiet", "--out", str(out), *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err


def _cli(args):
    code = f"import sys; from rtrl_jax.cli import main; sys.exit(main({args!r}))"
    return [sys.executable, "-c", code]


def test_killed_subprocess_resumes_to_the_same_parameters(tmp_path):
    args = [
        "task=add",
        "model.hidden=4",
        "estimator=uoro",
        "train.batch_size=2",
        "train.steps=3000",
        "train.chunk_size=50",
        "train.checkpoint_every=500",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    full = subprocess.Popen(
        _cli(["train", "--quiet", "--out", str(tmp_path / "full"), *args]), env=env, stdout=subprocess.DEVNULL
    )
    cut_dir = tmp_path / "cut"
    cut = subprocess.Popen(
        _cli(["train", "--quiet", "--out", str(cut_dir), *args]), env=env, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (cut_dir / "checkpoints" / "500").is_dir():
        assert cut.poll() is None and time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)
    assert cut.wait(timeout=120) == 130
    summary = json.loads((cut_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 500 <= summary["steps"] < 3000
    resume = subprocess.run(
        _cli(["train", "--quiet", "--resume", str(cut_dir)]), env=env, capture_output=True, timeout=300
    )
    assert resume.returncode == 0, resume.stderr.decode()[-2000:]
    assert full.wait(timeout=300) == 0
    summary = json.loads((cut_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] >= 500
    _assert_same_leaves(restore_final_state(cut_dir), restore_final_state(tmp_path / "full"))


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rtrl", "tbptt", "snap", "rflo", "ok"])  # kf, uoro: above
def test_every_estimator_resumes_bitwise(estimator, tmp_path):
    extra = ["model.cell=leaky"] if estimator == "rflo" else []
    experiment = build(
        load_config(None, [*SMALL, f"estimator={estimator}", "train.checkpoint_every=20", *extra])
    )
    run_training(experiment, tmp_path / "full")

    def interrupt(steps_done, info):
        if steps_done == 30:
            os.kill(os.getpid(), signal.SIGTERM)

    assert run_training(experiment, tmp_path / "cut", on_chunk=interrupt)["status"] == "interrupted"
    assert run_training(experiment, tmp_path / "cut", resume=True)["resumed_from"] == 30
    _assert_same_leaves(restore_final_state(tmp_path / "cut"), restore_final_state(tmp_path / "full"))


# ---------------------------------------------------------------- plots and metrics files


def test_plot_writes_a_png(full_run, tmp_path, capsys):
    _, out, _ = full_run
    png = tmp_path / "curves.png"
    assert main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss,accuracy,grad_norm,weight,nonfinite"
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics" in capsys.readouterr().err


# ---------------------------------------------------------------- rejected input


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.nonfinite=maybe"], "train.nonfinite.*'maybe'.*skip, stop, ignore"),
        (["train.checkpoint_every=15", "train.chunk_size=10"], "train.checkpoint_every: 15"),
        (["train.checkpoint_every=-1"], "train.checkpoint_every"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
        (["estimator=ok", "estimator_options.rank=0"], "rank.*0"),
        (["estimator=kf", "estimator_options.rank=2"], "'rank'"),
        (["task=char", "task_options.path=/no/such/file.txt"], "/no/such/file.txt.*does not exist"),
    ],
)
def test_rejected_values_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named):
        build(load_config(None, overrides))


def test_resume_rejects_overrides_and_non_run_folders(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "train.steps=5"]) == 2
    assert "--resume RUN_DIR takes the run's own config.yaml" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
