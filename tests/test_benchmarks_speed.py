"""The speed benchmarks at a tiny size: each script's command line runs and writes its table.

The numbers are not checked (timings are for the benchmark runs on an idle machine); what is checked
is that every configuration a script times compiles, runs and lands in its table, with the rows the
README's tables are built from.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kf_flops  # noqa: E402
import online_loop  # noqa: E402
import rtrl_row_blocks  # noqa: E402

pytestmark = pytest.mark.slow  # a dozen compiled steps per script: 10-20 s of CPU each


def _table_rows(path):
    return [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]


def test_rtrl_row_blocks_times_the_default_and_each_block_count(tmp_path):
    out = tmp_path / "row_blocks.md"
    rtrl_row_blocks.main(
        [
            "--sizes",
            "8",
            "--cells",
            "tanh",
            "lstm",
            "--blocks",
            "1",
            "3",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = _table_rows(out)[1:]
    assert [row.split(" | ")[:3] for row in rows] == [
        [f"| {cell}", "8", blocks] for cell in ("tanh", "lstm") for blocks in ("default (1)", "1", "3")
    ]
    # row_blocks=3 orders the updates (and splits blocks over a third of the rows): a step holds one
    # part's product, not every block's.
    peaks = {tuple(row.split(" | ")[:3]): float(row.split(" | ")[-1].rstrip(" |")) for row in rows}
    assert peaks[("| lstm", "8", "3")] < peaks[("| lstm", "8", "1")]


def test_kf_flops_counts_and_times_each_layout(tmp_path):
    out = tmp_path / "kf_flops.md"
    kf_flops.main(
        ["--sizes", "8", "--estimators", "kf", "ok", "--repeats", "1", "--steps", "5", "--out", str(out)]
    )
    rows = _table_rows(out)[1:]
    assert len(rows) == 2 * 2 * 2  # estimators × layouts × cells
    assert all(float(row.split(" | ")[5]) > 0 for row in rows)  # XLA's FLOPs


def test_online_loop_times_the_packed_and_plain_loops_and_their_floors(tmp_path):
    out = tmp_path / "online_loop.md"
    online_loop.main(
        ["--estimators", "rflo", "uoro", "--hidden", "4", "--steps", "3", "--rounds", "1", "--out", str(out)]
    )
    rows = _table_rows(out)[1:]
    assert [row.split(" | ")[0] for row in rows] == ["| rflo", "| uoro"]
