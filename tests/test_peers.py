"""The peer comparison (benchmarks/peers.py): its table, its gradient check, its rtrl_jax side and the
command it gives each peer driver; with the peers' virtual environments present, the run itself."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import peers  # noqa: E402
from common import PEERS_DIR, parser  # noqa: E402
from problem import tanh_rnn  # noqa: E402


def _sweep(ours, theirs):
    """One fake sweep: rtrl_jax and two peers; ``theirs`` maps peer to {(algorithm, n): seconds}."""
    result = {"rtrl_jax": {"rows": [{"algorithm": a, "n": n, "step_s": s} for (a, n), s in ours.items()]}}
    for peer, rows in theirs.items():
        result[peer] = {"rows": [{"algorithm": a, "n": n, "step_s": s} for (a, n), s in rows.items()]}
    return result


def test_compare_gives_ratios_within_each_sweep_and_the_target_only_when_every_peer_is_slower():
    ours = {("rtrl", 32): 1e-3, ("uoro", 32): 1e-4, ("snap", 32): 2e-4}
    sweeps = [
        _sweep(ours, {"a": {("rtrl", 32): 2e-3, ("uoro", 32): 3e-4}, "b": {("rtrl", 32): 4e-3}}),
        _sweep(
            {k: 2 * v for k, v in ours.items()},
            {"a": {("rtrl", 32): 3e-3, ("uoro", 32): 1e-4}, "b": {("rtrl", 32): 4e-3}},
        ),
    ]
    table, _ = peers.compare(sweeps, {}, ["a", "b"])
    rows = {r["algorithm"]: r for r in table}
    assert [r["algorithm"] for r in table] == ["rtrl", "uoro", "snap"]  # the order of peers.ROWS
    np.testing.assert_allclose(rows["rtrl"]["peers"]["a"]["ratio"], [2.0, 1.5])
    np.testing.assert_allclose(rows["rtrl"]["peers"]["b"]["ratio"], [4.0, 2.0])
    assert rows["rtrl"]["target_1"]
    np.testing.assert_allclose(rows["uoro"]["peers"]["a"]["ratio"], [3.0, 0.5])
    assert not rows["uoro"]["target_1"]  # slower than peer a in the second sweep
    assert rows["snap"]["peers"] == {} and not rows["snap"]["target_1"]

    md = peers.markdown(table, [], ["a", "b"], "ref")
    lines = md.splitlines()
    assert lines[0].count("|") == lines[2].count("|") == lines[1].count("|")
    assert "| rtrl | 32 | 1.000–2.000 | 2.000–3.000 | 1.50–2.00 | 4.000 | 2.00–4.00 | yes |" in md
    assert "| uoro | 32 |" in md and "| **no** |" in md
    assert "| snap | 32 | 0.200–0.400 | – | – | – | – | no peer |" in md
    assert "Target 1 (rtrl_jax faster than every peer in every sweep): 1 of 2 rows with a peer." in md
    assert "- missed: uoro, n = 32: a takes 0.50–3.00× rtrl_jax's time (rtrl_jax up to 2.00× slower)" in md


def test_kf_is_timed_as_the_peers_run_it_and_per_kernel_beside_it():
    """The row compared with the peers is KF-RTRL with one factor per pre-activation (theirs); the
    per-kernel default is an rtrl_jax row of its own, timed whenever KF is and tabled after it."""
    assert peers._algorithm("kf") == ("kf", {"joint": True})
    assert peers._algorithm("kf-per-kernel") == ("kf", {})
    assert peers.ROWS == ("rtrl", "uoro", "kf", "kf-per-kernel", "snap", "rflo")


@pytest.mark.slow  # two compiled scans
def test_kf_rows_run_different_estimators():
    problem = tanh_rnn(4, 3)
    joint, per_kernel = (peers.rtrl_jax_run(name, problem, 3)() for name in ("kf", "kf-per-kernel"))
    assert np.isfinite(joint).all() and np.isfinite(per_kernel).all()
    assert not np.allclose(joint, per_kernel)  # different estimators on the same keys


def test_compare_checks_each_gradient_against_the_reference():
    reference = np.array([[1.0, -2.0], [0.5, 0.0]])
    check = {"rtrl": {"reference": reference, "x": reference + 1e-6, "y": reference + [[0.0, 0.1], [0, 0]]}}
    _, checks = peers.compare([_sweep({("rtrl", 8): 1.0}, {})], check, [])
    by_system = {c["system"]: c for c in checks}
    assert by_system["x"]["error"] == pytest.approx(0.5e-6) and by_system["x"]["agrees"]
    assert by_system["y"]["error"] == pytest.approx(0.05) and not by_system["y"]["agrees"]
    md = peers.markdown([], checks, [], "ref")
    assert "| rtrl | x | 5.0e-07 | yes |" in md and "| rtrl | y | 5.0e-02 | **no** |" in md


@pytest.mark.parametrize("name", ["rtrl", "snap", "rflo"])
def test_rtrl_jax_side_computes_the_gradient_the_peers_are_checked_against(name):
    """The scanned rtrl_jax run accumulates the BPTT gradient (exact RTRL) on the problem's weights and
    data; SnAp-1 and RFLO, which the peers are compared with, are different (so the check can fail)."""
    problem = tanh_rnn(6, 12)
    ours = peers.rtrl_jax_run(name, problem, 12)()
    bptt = peers.bptt_rows(problem)
    assert ours.shape == bptt.shape == (6, 6 + 8 + 1)
    error = np.abs(ours - bptt).max() / np.abs(bptt).max()
    if name == "rtrl":
        assert error < 1e-5
    else:
        assert error > 1e-2


def test_problem_is_the_same_for_every_system_and_differs_by_n():
    a, b = tanh_rnn(8, 5), tanh_rnn(8, 5)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in a)
    assert not np.array_equal(tanh_rnn(8, 5, seed=1)["w_rec"], a["w_rec"])


def test_peer_command_passes_the_run_options_to_the_driver():
    options = {"sizes": [32, 64], "algorithms": ["rtrl", "kf"], "steps": 7, "fast_steps": 50, "repeats": 2}
    options |= {"check_n": 16, "check_steps": 9, "seed": 3}
    command = peers.peer_command("sketched-rtrl", argparse.Namespace(peers_dir=Path("/p"), **options))
    assert command[0] == "/p/venv-sketched-rtrl/bin/python"
    assert command[1].endswith("benchmarks/peers/time_sketched_rtrl.py")
    parsed = parser("x").parse_args(command[2:])  # the driver's own command line accepts it
    assert parsed.sizes == [32, 64] and parsed.algorithms == ["rtrl", "kf"]
    assert (parsed.steps, parsed.fast_steps, parsed.repeats) == (7, 50, 2)
    assert (parsed.check_n, parsed.check_steps, parsed.seed) == (16, 9, 3)


PRESENT = [p for p in peers.PEERS if (PEERS_DIR / f"venv-{p}" / "bin" / "python").exists()]


@pytest.mark.slow
@pytest.mark.skipif(
    not PRESENT, reason=f"no peer virtual environment in {PEERS_DIR} (benchmarks/peers/setup.sh)"
)
def test_run_against_the_installed_peers_agrees_on_the_gradient(tmp_path):
    out = tmp_path / "peers.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--sizes", "8", "--steps", "2"]
    command += [
        "--fast-steps",
        "4",
        "--repeats",
        "1",
        "--sweeps",
        "1",
        "--check-n",
        "6",
        "--check-steps",
        "6",
    ]
    command += ["--peers", *PRESENT, "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    record = json.loads(out.with_suffix(".json").read_text())
    assert {c["system"] for c in record["checks"]} >= set(PRESENT)
    assert all(c["agrees"] for c in record["checks"]), record["checks"]
    assert all(set(r["peers"]) <= set(PRESENT) for r in record["table"])
