"""What one KF-RTRL step computes: XLA's FLOP count of the compiled step against ``2 n³``.

``2 n³`` is one ``D_t A`` product for one ``n × n`` factor. A step propagates every stored
carry-side row through ``D_t``: the ``A`` factor of every Dense kernel (``out`` rows each: a tanh
RNN has an input and a recurrent kernel) and the rows of the parameters tracked exactly (the
biases), so it costs ``2 · rows · n²``. The count is XLA's ``cost_analysis()`` of the compiled step
(deterministic, no timing).

Usage::

    python benchmarks/kf_flops.py                # tanh RNN and GRU at n = 256
    python benchmarks/kf_flops.py --sizes 128 256 --estimators kf ok
"""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _report  # noqa: E402

import rtrl_jax as rj  # noqa: E402
from rtrl_jax._src.kronecker import kronecker_layout  # noqa: E402

INPUT = 8
CELLS = {"tanh": nn.SimpleCell, "gru": nn.GRUCell}


def count(name, cell, n):
    core = rj.from_linen(CELLS[cell](n), INPUT)
    params, carry = core.init(jax.random.PRNGKey(0))
    estimator = rj.make_estimator(name, core)
    trace = estimator.init(params, carry)
    step = jax.jit(lambda t, c, x, k: estimator.step(t, params, c, x, key=k))
    cost = step.lower(trace, carry, jnp.ones(INPUT), jax.random.PRNGKey(1)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    rank = trace.a[0].shape[0]
    rows = rank * sum(k.out_size for k in kronecker_layout(core).kernels) + trace.exact.shape[0]
    flops = float(cost["flops"])
    return f"| {name} | {cell} | {n} | {rows} | {flops:.3g} | {flops / (2 * n**3):.2f} | {rows / n:.2f} |"


def main(argv=None):
    parser = _report.parser(__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256])
    parser.add_argument("--estimators", nargs="+", default=["kf"])
    args = parser.parse_args(argv)
    header = "| estimator | cell | n | rows through D_t | XLA FLOPs | / 2n³ | rows / n |\n" + "|---" * 7 + "|"
    print(header)
    rows = []
    for name in args.estimators:
        for cell in CELLS:
            for n in args.sizes:
                rows.append(count(name, cell, n))
                print(rows[-1], flush=True)
    _report.write(
        args.out, "kf_flops.py", argv, _report.environment("FLOPs of one step"), "\n".join([header, *rows])
    )


if __name__ == "__main__":
    main()
