"""What one KF-RTRL (or r-OK) step computes and how fast: XLA's FLOP and byte counts of the
compiled step against ``2 n³``, and its time against a square matmul timed in the same run.

``2 n³`` is one ``D_t A`` product for one ``n × n`` factor. A step propagates every stored
carry-side row through ``D_t``: the ``A`` factor of every Dense kernel (``out`` rows each: a tanh
RNN has an input and a recurrent kernel) and the rows of the parameters tracked exactly (the
biases), so it costs ``2 · rows · n²``. With ``joint=True`` (layout ``joint``) the kernels summed
into one pre-activation share one factor with their biases: the tanh RNN has one ``n``-row factor
and no exact rows, the peers' and Mujika et al.'s KF-RTRL; a GRU four factors instead of six kernels
and four biases. The counts are XLA's ``cost_analysis()`` of the compiled step (``flops``,
``bytes accessed``: deterministic). The time is one full online training step
(``benchmarks/speed_memory.py``'s scan of ``--steps`` steps of step, grad and accumulation, best
of ``--repeats``, divided by the steps: a long scan, as in training, so that the call's fixed cost
(0.6–0.8 ms for the tanh RNN at n = 256) is not counted as the step's);
``× square mm`` is its FLOP rate over the rate of one 1024³ float32 matmul timed right before the
row (``mm GFLOP/s``: the reference moves with the machine's load and clock, by up to half from row
to row of one run here, so each row is held to the rate of its moment), ``step / 2n³ at mm rate``
the step's time in units of one ``2 n³`` product at that rate.
``--no-time`` gives the deterministic columns only.

Usage::

    python benchmarks/kf_flops.py                # KF-RTRL, tanh RNN and GRU at n = 256, both layouts
    python benchmarks/kf_flops.py --sizes 128 256 --estimators kf ok --layouts joint
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _report  # noqa: E402
import speed_memory  # noqa: E402

import rtrl_jax as rj  # noqa: E402

SQUARE = 1024


LAYOUTS = {"per-kernel": False, "joint": True}  # layout -> the estimators' ``joint`` option


def count(name, cell, n, joint=False):
    """XLA's cost analysis of one step: ``(flops, bytes accessed, rows through D_t)``."""
    core = rj.from_linen(speed_memory.CELLS[cell](n), speed_memory.INPUT)
    params, carry = core.init(jax.random.PRNGKey(0))
    estimator = rj.make_estimator(name, core, joint=joint)
    trace = estimator.init(params, carry)
    step = jax.jit(lambda t, c, x, k: estimator.step(t, params, c, x, key=k))
    x = jnp.ones(speed_memory.INPUT)
    cost = step.lower(trace, carry, x, jax.random.PRNGKey(1)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # Every stored carry-side row: r · out per factor (r · in for reverse KF-RTRL), and the exact ones.
    rows = sum(a.shape[0] * a.shape[1] for a in trace.a) + trace.exact.shape[0]
    return float(cost["flops"]), float(cost["bytes accessed"]), rows


def main(argv=None):
    parser = _report.parser(__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256])
    parser.add_argument("--estimators", nargs="+", default=["kf"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="scan length of one timed call")
    parser.add_argument("--no-time", action="store_true", help="XLA's counts only (deterministic)")
    args = parser.parse_args(argv)
    timed = not args.no_time
    columns = [
        "estimator",
        "layout",
        "cell",
        "n",
        "rows through D_t",
        "XLA FLOPs",
        "/ 2n³",
        "rows / n",
        "XLA MB",
    ]
    if timed:
        columns += ["step ms", "GFLOP/s", "mm GFLOP/s", "× square mm", "step / 2n³ at mm rate"]
    header = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
    print(header)
    lines, rows = [], []
    for name in args.estimators:
        for cell in speed_memory.CELLS:
            for n, layout in ((n, layout) for n in args.sizes for layout in args.layouts):
                joint = LAYOUTS[layout]
                flops, nbytes, through = count(name, cell, n, joint)
                row = {
                    "estimator": name,
                    "layout": layout,
                    "cell": cell,
                    "n": n,
                    "rows": through,
                    "flops": flops,
                    "bytes": nbytes,
                }
                cells = [
                    name,
                    layout,
                    cell,
                    n,
                    through,
                    f"{flops:.3g}",
                    f"{flops / (2 * n**3):.2f}",
                    f"{through / n:.2f}",
                ]
                cells.append(f"{nbytes / 1e6:.2f}")
                if timed:
                    square_rate = speed_memory.matmul_rate(SQUARE, SQUARE, SQUARE)
                    bench = speed_memory.bench_estimator(
                        name, cell, n, 1, args.steps, args.repeats, joint=joint
                    )
                    step_s = bench["step_s"]
                    row.update(
                        step_s=step_s,
                        square_matmul_rate=square_rate,
                        fraction_of_square_matmul=flops / step_s / square_rate,
                    )
                    cells += [
                        f"{step_s * 1e3:.3f}",
                        f"{flops / step_s / 1e9:.1f}",
                        f"{square_rate / 1e9:.1f}",
                    ]
                    cells += [
                        f"{flops / step_s / square_rate:.2f}",
                        f"{step_s * square_rate / (2 * n**3):.2f}",
                    ]
                rows.append(row)
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
                print(lines[-1], flush=True)
    details = "FLOPs and bytes of one step"
    if timed:
        details += f"; float32; {args.steps} steps per timed call"
    _report.write(
        args.out, "kf_flops.py", argv, _report.environment(details), "\n".join([header, *lines]), rows
    )


if __name__ == "__main__":
    main()
