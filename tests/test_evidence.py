"""The evidence-accumulation task and the spiking learning benchmark.

- with deterministic spikes (``rate = 1``, no noise) the inputs show each cue on its side, the recall
  cue, and the target is the majority side, on the recall steps only;
- the spike probabilities of active and background channels match ``rate`` and ``noise_rate``
  within four standard errors;
- windows join into the stream; options are checked; the task is registered;
- ``benchmarks/spiking.py`` at a tiny size writes its table.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rtrl_jax import evidence_task
from rtrl_jax.experiment import TASKS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import spiking  # noqa: E402

OPTIONS = {"num_cues": 3, "cue_steps": 2, "gap_steps": 1, "delay_steps": 3, "recall_steps": 2, "channels": 2}
EPISODE = 3 * (2 + 1) + 3 + 2


def _sample(task, key, num_steps):
    return jax.jit(task.sample, static_argnums=1)(key, num_steps)


def test_deterministic_spikes_show_the_cues_and_the_target_is_the_majority():
    task = evidence_task(**OPTIONS, rate=1.0, noise_rate=0.0)
    assert task.input_size == 8 and task.num_classes == 2
    stream = jax.tree.map(np.asarray, _sample(task, jax.random.PRNGKey(0), 20 * EPISODE))
    assert np.array_equal(np.flatnonzero(stream.reset), np.arange(0, 20 * EPISODE, EPISODE))
    majorities = []
    for episode in range(20):
        steps = slice(episode * EPISODE, (episode + 1) * EPISODE)
        inputs, targets, mask = stream.inputs[steps], stream.targets[steps], stream.mask[steps]
        groups = inputs.reshape(EPISODE, 4, 2)
        assert np.all(groups == groups[:, :, :1])  # a group's channels fire together at rate 1
        left, right, recall, noise = (groups[:, g, 0] for g in range(4))
        assert not noise.any()
        sides = []
        for cue in range(3):
            shown = slice(3 * cue, 3 * cue + 2)
            assert left[shown].all() != right[shown].all() and (left[shown] == left[3 * cue]).all()
            sides.append(int(right[3 * cue]))
            assert not left[3 * cue + 2] and not right[3 * cue + 2]  # the gap
        assert not (left[9:] + right[9:]).any()
        np.testing.assert_array_equal(recall, [0] * 12 + [1, 1])
        np.testing.assert_array_equal(mask, recall)
        majority = int(sum(sides) >= 2)
        np.testing.assert_array_equal(targets[12:], np.eye(2)[[majority, majority]])
        assert not targets[:12].any()
        majorities.append(majority)
    assert 0 < sum(majorities) < 20


def test_spike_probabilities_match_the_rates():
    rate, noise_rate, episodes = 0.3, 0.1, 400
    task = evidence_task(**OPTIONS, rate=rate, noise_rate=noise_rate)
    stream = jax.tree.map(np.asarray, _sample(task, jax.random.PRNGKey(1), episodes * EPISODE))
    groups = stream.inputs.reshape(-1, 4, 2)
    recall = stream.mask > 0
    for observed, p in ((groups[recall, 2], rate), (groups[:, 3], noise_rate)):
        n = observed.size
        assert abs(observed.mean() - p) < 4 * np.sqrt(p * (1 - p) / n), (observed.mean(), p, n)
    cue_steps = groups[:, :2].sum(axis=(1, 2)) > 0
    active = groups[:, :2].max(axis=2)  # which side fires at all, per step
    assert abs(active[cue_steps].sum(axis=1).mean() - 1.0) < 1e-12  # never both sides


def test_windows_join_and_options_are_checked():
    task = TASKS["evidence"](**OPTIONS)
    key = jax.random.PRNGKey(2)
    whole, tail = jax.jit(lambda k: (task.sample(k, 40), task.window(k, 17, 23)))(key)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(tail), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[17:], b)
    with pytest.raises(ValueError, match="odd"):
        evidence_task(num_cues=4)
    with pytest.raises(ValueError, match="probability"):
        evidence_task(rate=1.5)
    with pytest.raises(ValueError, match="delay_steps"):
        evidence_task(delay_steps=-1)


ESTIMATORS = {
    "eprop feedback=random": "{estimator: eprop, feedback: random}",
    "tbptt window=episode": "{estimator: tbptt, window: episode}",
}


@pytest.mark.parametrize(
    "cells, labels",
    [
        (["alif"], ["eprop feedback=random"]),
        pytest.param(["lif", "alif"], list(ESTIMATORS), marks=pytest.mark.slow),
    ],
)
def test_spiking_benchmark_writes_its_table(tmp_path, cells, labels):
    overrides = [
        f"cells=[{', '.join(cells)}]",
        "hidden=4",
        "batch_size=2",
        "episodes=2",
        "chunk_episodes=1",
        "seeds=1",
        "learning_rates=[0.001]",
        f"task_options={json.dumps(OPTIONS)}",
        f"estimators=[{', '.join(ESTIMATORS[label] for label in labels)}]",
    ]
    config = str(ROOT / "configs" / "bench_evidence.yaml")
    assert spiking.main([config, *overrides, "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "evidence.json").read_text())
    assert document["episode_steps"] == EPISODE
    table = (tmp_path / "evidence.md").read_text()
    for cell in cells:
        for label in labels:
            row = document["results"][cell][label]
            assert len(row["loss_curve"][0]) == 2 and np.isfinite(row["final_loss"][0])
        assert table.count(f"\n| {cell} |") == len(labels)
    assert spiking.last_cue_accuracy(3) == 0.75 and spiking.last_cue_accuracy(5) == 0.6875
