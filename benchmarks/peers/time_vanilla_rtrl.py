"""Times the NumPy ``vanilla-rtrl`` reference implementation (Marschall, Cho & Savin 2020).

Run by the interpreter of ``$PEERS_DIR/venv-vanilla-rtrl`` (see ``setup.sh``), with the clone of
https://github.com/omarschall/vanilla-rtrl in ``$PEERS_DIR/vanilla-rtrl``. Its RNN is
``a_t = (1 - α) a_{t-1} + α tanh(W_rec a_{t-1} + W_in x_t + b_rec)``; ``α = 1`` is the tanh RNN of
:mod:`problem`. One step, as in its ``Simulation``: ``rnn.next_state(x)``,
``learn_alg.update_learning_vars()``, the feedback ``q = w_t ⊙ a_t`` set where
``propagate_feedback_to_hidden`` would, ``learn_alg.get_rec_grads()`` (the readout's gradient is
left out, as in every system here).
The library keeps its influence matrix in float64 (``np.zeros``) and builds ``[a; x; 1]`` with an
integer ``1``, so its arithmetic is float64 although the weights and data are float32. Its RFLO
filters ``α_RFLO · I_t`` (Murray's convention) with ``α_RFLO = 1 - RFLO_LEAK``; the gradient is
reported divided by ``α_RFLO``, which is the trace ``J_t = RFLO_LEAK · J_{t-1} + I_t``.
It has no SnAp-1.

Usage: ``$PEERS_DIR/venv-vanilla-rtrl/bin/python benchmarks/peers/time_vanilla_rtrl.py --sizes 32 64``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEERS_DIR, clone_commit, drive  # noqa: E402
from problem import RFLO_LEAK  # noqa: E402

SOURCE = PEERS_DIR / "vanilla-rtrl"
sys.path.insert(0, str(SOURCE))
from core import RNN  # noqa: E402
from functions import identity, mean_squared_error, tanh  # noqa: E402
from learning_algorithms import KF_RTRL, RFLO, RTRL, UORO  # noqa: E402

ALGORITHMS = {
    "rtrl": (lambda rnn: RTRL(rnn), 1.0),
    "uoro": (lambda rnn: UORO(rnn), 1.0),
    "kf": (lambda rnn: KF_RTRL(rnn), 1.0),
    "rflo": (lambda rnn: RFLO(rnn, alpha=1.0 - RFLO_LEAK), 1.0 - RFLO_LEAK),
}


def _make_run(name):
    build, scale = ALGORITHMS[name]

    def make_run(problem, steps):
        n = problem["w_rec"].shape[0]

        def run():
            np.random.seed(0)
            rnn = RNN(
                problem["w_in"],
                problem["w_rec"],
                np.zeros((1, n), np.float32),
                problem["bias"],
                np.zeros(1, np.float32),
                activation=tanh,
                alpha=1,
                output=identity,
                loss=mean_squared_error,
            )
            rnn.reset_network(h=np.zeros(n, np.float32))
            learner = build(rnn)
            total = 0.0
            for t in range(steps):
                rnn.next_state(problem["xs"][t])
                learner.update_learning_vars()
                learner.q = problem["ws"][t] * rnn.a
                total = total + learner.get_rec_grads()
            return total / scale  # rows [∂W_rec | ∂W_in | ∂b_rec], as problem.gradient_rows

        return run

    return make_run


if __name__ == "__main__":
    drive(
        "vanilla-rtrl",
        {"vanilla-rtrl": clone_commit(SOURCE), "numpy": np.__version__, "python": sys.version.split()[0]},
        {name: _make_run(name) for name in ALGORITHMS},
        notes="NumPy loop; float64 arithmetic (the library's own state dtype); no SnAp-1",
    )
