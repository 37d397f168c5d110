"""Times braintrace (JAX; PyPI ``braintrace``) on its own scan, ``learner.etrace_grad``, jitted.

Run by the interpreter of ``$PEERS_DIR/venv-braintrace`` (see ``setup.sh``; braintrace brings its
own jax). The model is ``braintrace.nn.ValinaRNNCell(INPUT, n, activation='tanh')`` with the
weights of :mod:`problem` (its one ``Linear`` reads ``[x; h]``); ``etrace_grad`` drives the
sequence, calling the learner once per step, with the step loss ``½ Σ w_t ⊙ h_t²`` and
``reduction='sum'``, inside ``brainstate.transform.jit`` (two untimed calls: the second still
compiles). Algorithms: exact RTRL is ``SnAp(n=2)`` (for a fully connected cell SnAp-2 saturates
to within-group RTRL, which is exact here: one hidden group), SnAp-1 is ``SnAp(n=1)``, UORO is
``UORO``. braintrace has no KF-RTRL, and its RFLO-like rules (e-prop, three-factor) are not the
trace ``J_t = RFLO_LEAK · J_{t-1} + I_t`` of this tanh RNN, so neither is timed.

Usage: ``$PEERS_DIR/venv-braintrace/bin/python benchmarks/peers/time_braintrace.py --sizes 32``
"""

from __future__ import annotations

import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import brainstate
import braintrace
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import drive  # noqa: E402
from problem import INPUT, gradient_rows  # noqa: E402

ALGORITHMS = {
    "rtrl": (braintrace.SnAp, {"n": 2}),
    "snap": (braintrace.SnAp, {"n": 1}),
    "uoro": (braintrace.UORO, {}),
}


def _make_run(name):
    algorithm, options = ALGORITHMS[name]

    def make_run(problem, steps):
        n = problem["w_rec"].shape[0]
        model = braintrace.nn.ValinaRNNCell(INPUT, n, activation="tanh")
        kernel = np.concatenate([problem["w_in"].T, problem["w_rec"].T], axis=0)
        model.W.weight.value = {"weight": jnp.asarray(kernel), "bias": jnp.asarray(problem["bias"])}
        xs, ws = jnp.asarray(problem["xs"]), jnp.asarray(problem["ws"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SnAp-2's note that its pattern widened to all units
            learner = braintrace.compile(model, algorithm, xs[0], **options)

        def step_loss(x, w):
            return 0.5 * jnp.sum(w * learner(x) ** 2)

        @brainstate.transform.jit
        def scan(xs, ws):
            learner.reset_state()
            return learner.etrace_grad(xs, ws, step_fn=step_loss, reduction="sum")

        def run():
            grads = jax.block_until_ready(scan(xs, ws))
            (leaf,) = grads.values()
            kernel = np.asarray(leaf["weight"])
            return gradient_rows(kernel[INPUT:].T, kernel[:INPUT].T, np.asarray(leaf["bias"]))

        return run

    return make_run


if __name__ == "__main__":
    drive(
        "braintrace",
        {name: version(name) for name in ("braintrace", "brainstate", "jax", "jaxlib", "numpy")}
        | {"python": sys.version.split()[0]},
        {name: _make_run(name) for name in ALGORITHMS},
        notes="JAX, its own scan (etrace_grad) jitted; exact RTRL = SnAp(n=2); no KF-RTRL, no RFLO",
        warmup=2,
    )
