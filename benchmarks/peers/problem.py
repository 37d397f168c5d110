"""The tanh RNN and data every system of the peer comparison builds, from a seed, with NumPy only.

``h_t = tanh(W h_{t-1} + U x_t + b)``, ``h_0 = 0``, with ``n`` units and ``INPUT`` inputs; the step
loss is ``L_t = ½ Σ_i w_{t,i} h_{t,i}²`` with weights ``w_t`` from the data's second stream, so its
cotangent is ``∂L_t/∂h_t = w_t ⊙ h_t`` (the loss ``benchmarks/speed_memory.py`` times), and the
accumulated online gradient of exact RTRL over ``T`` steps is the BPTT gradient of ``Σ_t L_t``.
Every driver (each in its own virtual environment) imports this file, so all of them train the
identical network on identical inputs.
"""

from __future__ import annotations

import numpy as np

INPUT = 8
# RFLO's trace leak α = 1 - 1/τ with τ = 10 steps, the same in every system.
RFLO_LEAK = 0.9


def tanh_rnn(n: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights ``w_rec`` (n × n), ``w_in`` (n × INPUT), ``bias`` (n), inputs ``xs``
    (steps × INPUT) and loss weights ``ws`` (steps × n) drawn from ``seed`` and ``n``."""
    rng = np.random.default_rng([seed, n])
    arrays = {
        "w_rec": 0.9 * rng.standard_normal((n, n)) / np.sqrt(n),
        "w_in": rng.standard_normal((n, INPUT)) / np.sqrt(INPUT),
        "bias": 0.1 * rng.standard_normal(n),
        "xs": rng.standard_normal((steps, INPUT)),
        "ws": rng.standard_normal((steps, n)) / np.sqrt(n),
    }
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def gradient_rows(grad_rec: np.ndarray, grad_in: np.ndarray, grad_bias: np.ndarray) -> np.ndarray:
    """The ``(n, n + INPUT + 1)`` rows ``[∂W | ∂U | ∂b]`` every driver reports its gradient as."""
    return np.concatenate([grad_rec, grad_in, grad_bias[:, None]], axis=1)
