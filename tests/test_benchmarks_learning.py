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
from learning import influence_balancing_core, load_benchmark_config, run_benchmark  # noqa: E402


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
            [
                "steps=150",
                "check_every=50",
                "hidden=4",
                "seeds=2",
                "batch_size=2",
                "threshold=10.0",
                "estimators=[{estimator: kf}]",
            ],
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


def test_char_lm_reads_any_text_file_and_reports_bits_per_character(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("the cat sat on the mat. " * 80)
    out = tmp_path / "out"
    code = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "learning.py"),
            str(CONFIGS / "bench_char_lm.yaml"),
            f"text={text}",
            "steps=100",
            "chunk=50",
            "valid_chars=300",
            "hidden=4",
            "batch_size=2",
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
    bpc = doc["results"]["tbptt window=5"]["valid_bpc"][0]
    assert np.isfinite(bpc) and 0 < bpc < 2 * np.log2(doc["vocab_size"])
    assert (out / "char_lm.png").exists() and "bits/char" in (out / "char_lm.md").read_text()


def test_benchmark_configs_are_checked(tmp_path):
    for path in sorted(CONFIGS.glob("bench_*.yaml")):
        load_benchmark_config(path)
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_benchmark_config(CONFIGS / "bench_add.yaml", ["nope=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        run_benchmark(
            load_benchmark_config(CONFIGS / "bench_char_lm.yaml", ["text=/nonexistent.txt"]), tmp_path
        )
