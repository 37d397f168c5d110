"""Exact RTRL's default ``row_blocks`` against ``row_blocks=1``: speed and peak memory in one run.

For each cell (tanh RNN, GRU, LSTM) and hidden size ``n``, the same jitted, donated ``lax.scan`` of ``T``
online training steps as ``benchmarks/speed_memory.py`` is compiled for ``rtrl(core)`` (the
default) and for ``rtrl(core, row_blocks=k)`` for each ``k`` of ``--blocks``. Peak memory is XLA's
``memory_analysis()`` of the compiled scan against the trace (deterministic); time per step is
measured with the configurations interleaved, ``--rounds`` rounds, and reported as the best round
of each and the median over rounds of the ratio to ``row_blocks=1`` within a round (a shared
machine's load shifts every configuration of a round alike).

Usage::

    python benchmarks/rtrl_row_blocks.py                          # n = 32, 64, 128; about 2 minutes
    python benchmarks/rtrl_row_blocks.py --sizes 32 64 128 256 --rounds 7   # about 5 minutes
    python benchmarks/rtrl_row_blocks.py --sizes 256 --blocks 1 4 8 --out results/x.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _report  # noqa: E402
import speed_memory as sm  # noqa: E402

import rtrl_jax as rj  # noqa: E402
from rtrl_jax._src.rtrl import default_row_blocks  # noqa: E402

# The speed benchmark's cells and an LSTM, whose trace is eight comparable blocks (four input and
# four recurrent kernels) where the tanh RNN's is one recurrent kernel and a GRU's six kernels.
CELLS = {**sm.CELLS, "lstm": lambda n: nn.LSTMCell(n)}


def bench(cell, n, blocks, steps, rounds):
    core, params, _, carries = sm._problem(cell, n, 1, CELLS)
    xs = jax.random.normal(jax.random.PRNGKey(2), (steps, 1, sm.INPUT), sm.DTYPE)
    keys = jax.random.split(jax.random.PRNGKey(3), (steps, 1))
    ws = jax.random.normal(jax.random.PRNGKey(4), (steps, 1, n), sm.DTYPE)
    configs = {}
    for k in (None, *blocks):
        estimator = rj.rtrl(core, row_blocks=k)
        init = jax.jit(jax.vmap(lambda c, estimator=estimator: estimator.init(params, c)))
        scan = sm._train_scan(core, estimator, params, steps, 1)
        lowered = scan.lower(init(carries), carries, xs, keys, ws)
        configs[k] = (init, lowered.compile())
    trace = init(carries)
    trace_bytes = sm._nbytes(trace)
    carry_size = jax.tree.leaves(trace)[0].shape[-1]
    dense = [jax.ShapeDtypeStruct((p.size, carry_size), sm.DTYPE) for p in jax.tree.leaves(params)]
    chosen = default_row_blocks(dense)
    times = {k: [] for k in configs}
    for _ in range(rounds):
        for k, (init, compiled) in configs.items():
            fresh = init(carries)
            jax.block_until_ready(fresh)
            start = time.perf_counter()
            jax.block_until_ready(compiled(fresh, carries, xs, keys, ws))
            times[k].append((time.perf_counter() - start) / steps)
    base = np.array(times[1]) if 1 in times else None
    rows = []
    for k, (_, compiled) in configs.items():
        t = np.array(times[k])
        rows.append(
            {
                "cell": cell,
                "n": n,
                "row_blocks": f"default ({chosen})" if k is None else str(k),
                "trace_bytes": trace_bytes,
                "step_ms": float(t.min() * 1e3),
                "over_unchunked": None if base is None else float(np.median(t / base)),
                "peak_over_trace": sm._peak(compiled) / trace_bytes,
            }
        )
    return rows


HEADER = "| cell | n | row_blocks | trace | step ms (best) | time / row_blocks=1 (median) | peak / trace |\n"
HEADER += "|---|---|---|---|---|---|---|"


def _row(r):
    ratio = "-" if r["over_unchunked"] is None else f"{r['over_unchunked']:.2f}"
    return (
        f"| {r['cell']} | {r['n']} | {r['row_blocks']} | {r['trace_bytes'] / 2**20:.2f} MiB"
        f" | {r['step_ms']:.3f} | {ratio} | {r['peak_over_trace']:.2f} |"
    )


def main(argv=None):
    parser = _report.parser(__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print(HEADER)
    rows = []
    for cell in args.cells:
        for n in args.sizes:
            for row in bench(cell, n, args.blocks, args.steps, args.rounds):
                rows.append(row)
                print(_row(row), flush=True)
    details = f"T = {args.steps} steps per call, {args.rounds} rounds"
    table = "\n".join([HEADER, *map(_row, rows)])
    _report.write(args.out, "rtrl_row_blocks.py", argv, _report.environment(details), table)


if __name__ == "__main__":
    main()
