"""What every peer timing driver shares: its command line, the timing rule and the JSON it prints.

A driver maps algorithm names (``rtrl``, ``uoro``, ``kf``, ``snap``, ``rflo``) to a function
``make_run(problem, steps) -> run``; ``run()`` performs ``steps`` online training steps of the tanh
RNN of :mod:`problem` from a fresh state — forward step, trace update, gradient of the step loss
from its cotangent ``w_t ⊙ h_t``, accumulated — and returns the accumulated gradient as the
``(n, n + INPUT + 1)`` rows of :func:`problem.gradient_rows`. Timing: ``warmup`` untimed calls
(they compile what a JIT compiles), then the best of ``--repeats`` calls, divided by ``steps``.
Deterministic algorithms also report their accumulated gradient over ``--check-steps`` steps at
``--check-n`` units, which the comparison driver checks against rtrl_jax's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from problem import tanh_rnn

# Where setup.sh puts the peers' clones and virtual environments: beside the repository by default.
PEERS_DIR = Path(os.environ.get("PEERS_DIR", Path(__file__).resolve().parents[3] / "peers"))
# Algorithms whose step costs Θ(n³) or more: timed over --steps steps; the others over --fast-steps.
SLOW = ("rtrl", "kf")
# Algorithms with no sampling, whose gradient over a short run is compared across systems.
DETERMINISTIC = ("rtrl", "snap", "rflo")

MakeRun = Callable[[Mapping[str, np.ndarray], int], Callable[[], np.ndarray]]


def add_run_options(result: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a run, shared by the comparison driver and every peer's timing driver."""
    result.add_argument("--algorithms", nargs="*", default=None, help="default: all the driver has")
    result.add_argument("--sizes", nargs="*", type=int, default=[32, 64, 128, 256])
    result.add_argument("--steps", type=int, default=10, help="steps per timed call, exact RTRL and KF")
    result.add_argument("--fast-steps", type=int, default=100, help="steps per timed call, the others")
    result.add_argument("--repeats", type=int, default=3)
    result.add_argument("--check-n", type=int, default=32)
    result.add_argument("--check-steps", type=int, default=20)
    result.add_argument("--seed", type=int, default=0)
    return result


def parser(doc: str) -> argparse.ArgumentParser:
    return add_run_options(argparse.ArgumentParser(description=doc.splitlines()[0]))


def clone_commit(source: Path) -> str:
    """The commit a peer's clone is checked out at."""
    done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def step_seconds(make_run: MakeRun, n: int, steps: int, repeats: int, seed: int, warmup: int) -> float:
    run = make_run(tanh_rnn(n, steps, seed), steps)
    for _ in range(warmup):
        run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / steps


def drive(
    system: str,
    versions: Mapping[str, str],
    algorithms: Mapping[str, MakeRun],
    notes: str = "",
    warmup: int = 1,
    argv=None,
) -> dict:
    """Times ``algorithms`` at every size (after ``warmup`` untimed calls) and prints (and returns)
    one JSON object."""
    args = parser(__doc__).parse_args(argv)
    names = [a for a in (args.algorithms or algorithms) if a in algorithms]
    rows = []
    for name in names:
        steps = args.steps if name in SLOW else args.fast_steps
        for n in args.sizes:
            seconds = step_seconds(algorithms[name], n, steps, args.repeats, args.seed, warmup)
            rows.append({"algorithm": name, "n": n, "step_s": seconds, "steps": steps})
    check = {}
    for name in (a for a in names if a in DETERMINISTIC):
        problem = tanh_rnn(args.check_n, args.check_steps, args.seed)
        check[name] = np.asarray(algorithms[name](problem, args.check_steps)(), np.float64).tolist()
    result = {"system": system, "versions": dict(versions), "notes": notes, "rows": rows, "check": check}
    print(json.dumps(result))
    return result
