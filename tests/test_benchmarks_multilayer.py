"""The multi-layer benchmark at a tiny size: every (model, task, method) runs and the outputs are written."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from rtrl_jax.experiment import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "bench_multilayer.yaml"
sys.path.insert(0, str(ROOT / "benchmarks"))
from multilayer import load_multilayer_config, run_benchmark  # noqa: E402


@pytest.mark.slow  # three whole-model compilations: about 20 s of CPU
def test_tiny_run_writes_json_table_and_plot(tmp_path):
    cfg = load_multilayer_config(
        CONFIG,
        [
            "steps=12",
            "chunk=6",
            "batch_size=2",
            "models={2-layer GRU: [model.cell=gru, model.hidden=2, model.layers=2]}",
            "tasks={copy: {overrides: [task=copy, task_options.length=1], window: 3}}",
        ],
    )
    cfg["methods"] = {name: cfg["methods"][name] for name in ("per-layer RTRL", "BPTT")}
    doc = run_benchmark(cfg, tmp_path, "tiny")
    rows = json.loads((tmp_path / "multilayer.json").read_text())["results"]["2-layer GRU"]["copy"]
    assert set(rows) == {"per-layer RTRL", "BPTT"}
    for row in rows.values():
        assert np.isfinite(row["final_loss"]) and row["step_ms"] > 0 and row["cost_ratio"] > 0
    # the BPTT window's buffer is smaller than the exact per-layer traces of a 2-unit GRU
    assert 0 < rows["BPTT"]["trace_bytes_per_stream"] < rows["per-layer RTRL"]["trace_bytes_per_stream"]
    table = (tmp_path / "multilayer.md").read_text()
    assert table.count("| 2-layer GRU | copy |") == 2 and doc["jax_version"] in table
    assert (tmp_path / "multilayer.png").read_bytes()[:4] == b"\x89PNG"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_multilayer_config(CONFIG, ["stepz=3"])
    with pytest.raises(ConfigError, match=r"tasks.copy: expected \{overrides"):
        load_multilayer_config(CONFIG, ["tasks={copy: [task=copy]}"])
