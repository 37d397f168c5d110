"""The per-layer trace cost benchmark at a tiny size: every measurement runs and the outputs are written."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from multilayer_cost import markdown_table, run  # noqa: E402

MEASUREMENTS = {
    "forward",
    "forward + SnAp-1 trace",
    "forward + RTRL (dense) trace",
    "online step (SnAp-1)",
    "BPTT",
}


@pytest.mark.slow  # five compiled models: about 20 s of CPU
def test_tiny_run_writes_json_and_table(tmp_path):
    doc = run([1, 2], chunk=4, batch_size=2, repeats=1, rtrl_max_hidden=1, out_dir=tmp_path, command="tiny")
    results = json.loads((tmp_path / "multilayer_cost.json").read_text())["results"]
    assert set(results["1"]["step_ms"]) == MEASUREMENTS
    assert set(results["2"]["step_ms"]) == MEASUREMENTS - {"forward + RTRL (dense) trace"}
    for row in results.values():
        assert row["ratio"]["forward"] == 1.0
        assert all(ms > 0 for ms in row["step_ms"].values())
    # SnAp-1 of a complex LRU keeps both entries of each unit per parameter; dense RTRL all S = 2
    assert (
        results["1"]["trace_bytes_per_stream"]["SnAp-1"]
        == results["1"]["trace_bytes_per_stream"]["RTRL (dense)"]
    )
    table = (tmp_path / "multilayer_cost.md").read_text()
    assert "| forward + RTRL (dense) trace |" in table and "not run" in table and doc["jax_version"] in table


def test_table_has_one_row_per_measurement_and_the_load():
    row = {"step_ms": {"forward": 0.5, "BPTT": 2.0}, "ratio": {"forward": 1.0, "BPTT": 4.0}}
    doc = {
        "results": {8: row, 64: {"step_ms": {"forward": 1.0}, "ratio": {"forward": 1.0}}},
        "config": {"batch_size": 8, "chunk": 100, "repeats": 5},
        "device": "cpu:cpu",
        "jax_version": "0.0",
        "load_before": "1.00 2.00 3.00",
        "load_after": "1.50 2.00 3.00",
        "command": "cmd",
    }
    table = markdown_table(doc)
    assert "| BPTT | 2 (4.00) | not run |" in table
    assert "| forward | 0.5 (1.00) | 1 (1.00) |" in table
    assert "load average 1.00 2.00 3.00 before" in table
