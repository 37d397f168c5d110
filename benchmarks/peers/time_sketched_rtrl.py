"""Times the PyTorch ``sketched-rtrl`` reference implementation (SK-RTRL; its exact RTRL, SnAp-1,
UORO, KF-RTRL and RFLO).

Run by the interpreter of ``$PEERS_DIR/venv-sketched-rtrl`` (see ``setup.sh``), with the clone of
https://github.com/sonaradarcn/sketched-rtrl in ``$PEERS_DIR/sketched-rtrl``. One step, as in its
``OnlineLearner.step``: ``h = cell(x, h)``, ``A, imm = cell.jac_pieces(x, h_prev, h)``,
``algo.step_state(A, imm)``, ``algo.grad_rows(w_t ⊙ h_t)`` (the readout and optimizer are left out, as
in every system here), under ``torch.no_grad()``, batch 1, float32, on the CPU. Its SnAp-1 is
``SKRTRL`` with ``r = 0``, which also updates its error certificate every step; its RFLO trace is
``S_t = (1 - 1/τ) S_{t-1} + I_t`` with ``τ = 1 / (1 - RFLO_LEAK)``.

Usage: ``$PEERS_DIR/venv-sketched-rtrl/bin/python benchmarks/peers/time_sketched_rtrl.py --sizes 32``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEERS_DIR, clone_commit, drive  # noqa: E402
from problem import INPUT, RFLO_LEAK  # noqa: E402

SOURCE = PEERS_DIR / "sketched-rtrl"
sys.path.insert(0, str(SOURCE))
from skrtrl.algos import ExactRTRL, SnAp1  # noqa: E402
from skrtrl.baselines import KFRTRL, RFLO, UORO  # noqa: E402
from skrtrl.cells import TanhRNNCell  # noqa: E402

ALGORITHMS = {
    "rtrl": lambda cell: ExactRTRL(cell, 1),
    "uoro": lambda cell: UORO(cell, 1),
    "kf": lambda cell: KFRTRL(cell, 1),
    "snap": lambda cell: SnAp1(cell, 1),
    "rflo": lambda cell: RFLO(cell, 1, tau=1.0 / (1.0 - RFLO_LEAK)),
}


def _cell(problem):
    n = problem["w_rec"].shape[0]
    cell = TanhRNNCell(INPUT, n)
    with torch.no_grad():
        cell.W.copy_(torch.from_numpy(problem["w_rec"]))
        cell.U.copy_(torch.from_numpy(problem["w_in"]))
        cell.b.copy_(torch.from_numpy(problem["bias"]))
    return cell


def _make_run(name):
    def make_run(problem, steps):
        cell = _cell(problem)
        xs = torch.from_numpy(problem["xs"])[:, None, :]
        ws = torch.from_numpy(problem["ws"])[:, None, :]

        @torch.no_grad()
        def run():
            torch.manual_seed(0)
            algo = ALGORITHMS[name](cell)
            h = cell.init_state(1)
            total = torch.zeros(cell.n, cell.p)
            for t in range(steps):
                h_prev = h
                h = cell(xs[t], h_prev)
                a, imm = cell.jac_pieces(xs[t], h_prev, h)
                algo.step_state(a, imm)
                total += algo.grad_rows(ws[t] * h)
            return total.numpy()  # rows [∂W | ∂U | ∂b], as problem.gradient_rows

        return run

    return make_run


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    drive(
        "sketched-rtrl",
        {
            "sketched-rtrl": clone_commit(SOURCE),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "torch_threads": str(torch.get_num_threads()),
        },
        {name: _make_run(name) for name in ALGORITHMS},
        notes="PyTorch loop, eager, batch 1, float32; SnAp-1 = SKRTRL(r=0) with its certificate",
    )
