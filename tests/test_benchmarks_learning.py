"""Learning benchmarks: influence balancing behaves as in the paper; each benchmark writes its outputs."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rtrl_jax.experiment import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT / "benchmarks"))
from learning import _char_chunk, influence_balancing_core, load_benchmark_config, run_benchmark  # noqa: E402


def test_influence_balancing_core_has_the_papers_fixed_point(x64):
    core, params, carry = influence_balancing_core(dtype=jnp.float64)
    s = carry
    for _ in range(400):
        s, _ = core(params, s, jnp.zeros((1,), jnp.float64))
    assert float(s[0]) == pytest.approx(2 * 0.5 * (10 - 13), rel=1e-9)  # s*¹ = 2θ·Σv = −3


def test_influence_balancing_exact_rtrl_converges_and_short_truncation_goes_the_wrong_way(tmp_path):
    cfg = load_benchmark_config(
        CONFIGS / "bench_influence_balancing.yaml",
        [
            "steps=4000",
            "seeds=1",
            "learning_rate=0.00005",
            "estimators=[{estimator: rtrl}, {estimator: tbptt, window: 1}]",
        ],
    )
    doc = run_benchmark(cfg, tmp_path)
    rows = doc["results"]
    assert abs(rows["rtrl"]["final_theta"][0] - doc["theta_star"]) < 0.05
    assert rows["tbptt window=1"]["final_theta"][0] > 0.5  # pushed away from θ* = −1/6
    assert (tmp_path / "influence_balancing.png").read_bytes()[:4] == b"\x89PNG"


COPY_TINY = [  # three checks of 50 steps; the level grows at every check: 1, 2, 3 (unless stopped)
    "steps=150",
    "check_every=50",
    "hidden=4",
    "seeds=2",
    "batch_size=2",
    "threshold=10.0",
    "target_length=2",
    "learning_rates=[0.01]",
    "estimators=[{estimator: kf}]",
]


@pytest.mark.parametrize(
    "name, overrides",
    [
        (
            "add",
            [
                "steps=200",
                "chunk=100",
                "hidden=4",
                "seeds=1",
                "learning_rates=[0.05, 0.01]",
                "estimators=[{estimator: rtrl}, {estimator: uoro, learning_rate: 0.001}]",
            ],
        ),
        (
            "copy_curriculum",
            # the configs draw lengths uniformly: both kinds run
            [*COPY_TINY, "lengths=fixed", "stop_at_target=false"],
        ),
    ],
)
def test_benchmarks_write_json_table_and_plot(tmp_path, name, overrides):
    doc = run_benchmark(load_benchmark_config(CONFIGS / f"bench_{name}.yaml", overrides), tmp_path)
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["benchmark"] == name and saved["results"]
    assert (tmp_path / f"{name}.md").read_text().startswith(("|", "Baselines"))
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    if name == "add":
        assert set(doc["sweep"]["rtrl"]) == {"0.05", "0.01"}
        assert doc["results"]["uoro lr=0.001"]["learning_rate"] == 0.001
    else:  # threshold above any loss: the length grows by one at every check
        assert doc["results"]["kf"]["length_reached"] == [3, 3]
        assert doc["results"]["kf"]["steps_to_target"] == [50, 50]  # level 2 from the second check
        assert "| steps to length 2 |" in (tmp_path / f"{name}.md").read_text()
        assert all(s > 0 for s in doc["results"]["kf"]["steps_per_s"])


def _tiny_text(tmp_path: Path) -> Path:
    text = tmp_path / "tiny.txt"
    text.write_text("the cat sat on the mat. " * 80)
    return text


TINY = {  # a few steps of every benchmark with scales, whatever the scale's sizes
    "char_lm": ["steps=6", "chunk=3", "hidden=3", "batch_size=2", "valid_streams=2", "seeds=2"],
    "copy_curriculum": ["steps=6", "check_every=3", "hidden=3", "batch_size=2", "seeds=2"],
}


@pytest.mark.parametrize("scale", ["cpu", "paper"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_both_scales_load_and_run_a_few_steps(tmp_path, name, scale):
    cpu = load_benchmark_config(CONFIGS / f"bench_{name}.yaml")
    cfg = load_benchmark_config(CONFIGS / f"bench_{name}.yaml", [f"scale={scale}"])
    assert cfg["scale"] == scale and cfg["learning_rates"] and cfg["seeds"] >= 3
    if name == "char_lm":  # every estimator at its best rate of a small sweep
        assert len(cfg["learning_rates"]) >= 2
    if scale == "cpu":  # the sizes the cpu-scale tables promise
        assert cfg["hidden"] >= (128 if name == "char_lm" else 64) and cfg["batch_size"] > 1
    else:
        assert cfg["hidden"] > cpu["hidden"] and cfg["steps"] > cpu["steps"]
    # the scale's first estimator at a tiny size, a few steps; the cpu case sweeps two rates
    estimators = [{k: v for k, v in cfg["estimators"][0].items() if k != "hidden"}]
    extra = [f"text={_tiny_text(tmp_path)}"] if name == "char_lm" else []
    rates = ["0.01", "0.003"] if scale == "cpu" else ["0.01"]
    tiny = [
        f"scale={scale}",
        *TINY[name],
        *extra,
        f"estimators={estimators}",
        f"learning_rates=[{', '.join(rates)}]",
    ]
    doc = run_benchmark(load_benchmark_config(CONFIGS / f"bench_{name}.yaml", tiny), tmp_path)
    stem = name if scale == "cpu" else f"{name}_paper"
    assert json.loads((tmp_path / f"{stem}.json").read_text())["config"]["scale"] == scale
    assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    for row in doc["results"].values():  # seed 0 at every rate, then seed 1 at the best one
        sweep = row["sweep_valid_bpc" if name == "char_lm" else "sweep_length"]
        assert sorted(sweep) == sorted(rates) and str(row["learning_rate"]) in sweep
        assert len(row["wall_s"]) == 2 and all(s > 0 for s in row["steps_per_s"])


@pytest.mark.slow  # compiles the chunk three times (two sweep rates, the whole budget)
def test_char_lm_sweeps_on_a_fraction_and_runs_an_estimator_at_its_own_size_and_budget(tmp_path):
    overrides = [
        f"text={_tiny_text(tmp_path)}",
        *TINY["char_lm"],
        "schedule=cosine",
        "sweep_fraction=0.5",
        "learning_rates=[0.01, 0.003]",
        "estimators=[{estimator: snap, hidden: 2, batch_size: 3, steps: 4}]",
    ]
    doc = run_benchmark(load_benchmark_config(CONFIGS / "bench_char_lm.yaml", overrides), tmp_path)
    row = doc["results"]["snap hidden=2 batch_size=3 steps=4"]
    assert (row["hidden"], row["batch_size"], row["steps"]) == (2, 3, 4)  # not the config's 3, 2, 6
    # every seed runs the whole budget; the sweep's seed-0 run is another, shorter one
    assert [len(curve) for curve in row["train_bpc_curves"]] == [4, 4]
    assert row["sweep_valid_bpc"][str(row["learning_rate"])] != row["valid_bpc"][0]
    assert "| snap hidden=2 batch_size=3 steps=4 | 2 | 3 × 4 |" in (tmp_path / "char_lm.md").read_text()
    with pytest.raises(ConfigError, match="sweep_fraction"):
        run_benchmark(
            load_benchmark_config(CONFIGS / "bench_char_lm.yaml", [*overrides, "sweep_fraction=0"]), tmp_path
        )


def test_char_lm_streams_read_the_text_contiguously_across_chunks_and_reset_where_they_wrap():
    ids = np.arange(10) % 4  # a 10-character text over 4 symbols
    offsets = np.array([0, 7])
    chunks = [_char_chunk(ids, offsets, start, 3, 4) for start in (0, 3, 6)]
    inputs = np.concatenate([np.argmax(c.inputs, -1) for c in chunks], axis=1)
    targets = np.concatenate([np.argmax(c.targets, -1) for c in chunks], axis=1)
    reset = np.concatenate([np.asarray(c.reset) for c in chunks], axis=1)
    positions = (offsets[:, None] + np.arange(9)) % 10
    np.testing.assert_array_equal(inputs, ids[positions])
    np.testing.assert_array_equal(targets, ids[(positions + 1) % 10])
    # stream 0 starts at position 0; stream 1 starts at 7 and wraps to position 0 at step 3
    np.testing.assert_array_equal(np.flatnonzero(reset[0]), [0])
    np.testing.assert_array_equal(np.flatnonzero(reset[1]), [0, 3])


def test_copy_curriculum_lengths_are_checked(tmp_path):
    cfg = load_benchmark_config(CONFIGS / "bench_copy_curriculum.yaml", ["lengths=random"])
    with pytest.raises(ConfigError, match="lengths: expected 'fixed' or 'uniform', got 'random'"):
        run_benchmark(cfg, tmp_path)
    no_target = ["stop_at_target=true", "target_length=null"]
    cfg = load_benchmark_config(CONFIGS / "bench_copy_curriculum.yaml", no_target)
    with pytest.raises(ConfigError, match="stop_at_target: needs a target_length"):
        run_benchmark(cfg, tmp_path)


def test_copy_curriculum_stops_at_the_target_length(tmp_path):
    overrides = [*COPY_TINY, "stop_at_target=true"]
    doc = run_benchmark(load_benchmark_config(CONFIGS / "bench_copy_curriculum.yaml", overrides), tmp_path)
    row = doc["results"]["kf"]
    assert row["length_reached"] == [2, 2] and row["steps_to_target"] == [50, 50]
    assert [len(curve) for curve in row["length_curves"]] == [2, 2]  # ended after its check at level 2
    assert (tmp_path / "copy_curriculum.png").read_bytes()[:4] == b"\x89PNG"


def test_scales_are_checked():
    with pytest.raises(ConfigError, match="scale: 'gpu' is not a scale of .*cpu, paper"):
        load_benchmark_config(CONFIGS / "bench_char_lm.yaml", ["scale=gpu"])
    with pytest.raises(ConfigError, match="its scales: none"):
        load_benchmark_config(CONFIGS / "bench_add.yaml", ["scale=paper"])
    # an override wins over the scale's value
    assert load_benchmark_config(CONFIGS / "bench_char_lm.yaml", ["scale=paper", "hidden=7"])["hidden"] == 7


def test_char_lm_reads_any_text_file_and_reports_bits_per_character(tmp_path):
    text = _tiny_text(tmp_path)
    out = tmp_path / "out"
    code = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "learning.py"),
            str(CONFIGS / "bench_char_lm.yaml"),
            f"text={text}",
            "steps=100",
            "chunk=50",
            "valid_fraction=0.2",
            "valid_streams=4",
            "hidden=4",
            "batch_size=2",
            "seeds=1",
            "learning_rates=[]",
            "learning_rate=0.01",
            "estimators=[{estimator: tbptt, window: 5}, {estimator: uoro}]",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert code.returncode == 0, code.stderr
    doc = json.loads((out / "char_lm.json").read_text())
    assert doc["vocab_size"] == len(set("the cat sat on the mat. "))
    assert doc["train_chars"] == 1920 - 384 and doc["valid_chars"] == 384  # the last 20%, 4 segments
    bpc = doc["results"]["tbptt window=5"]["valid_bpc"][0]
    assert np.isfinite(bpc) and 0 < bpc < 2 * np.log2(doc["vocab_size"])
    assert (out / "char_lm.png").exists() and "bits/char" in (out / "char_lm.md").read_text()


LEARNING_CONFIGS = ("add", "char_lm", "copy_curriculum", "influence_balancing")


def test_benchmark_configs_are_checked(tmp_path):
    for name in LEARNING_CONFIGS:
        for scale in ("cpu", "paper") if name in TINY else ("cpu",):
            load_benchmark_config(CONFIGS / f"bench_{name}.yaml", [f"scale={scale}"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_benchmark_config(CONFIGS / "bench_add.yaml", ["nope=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        run_benchmark(
            load_benchmark_config(CONFIGS / "bench_char_lm.yaml", ["text=/nonexistent.txt"]), tmp_path
        )
