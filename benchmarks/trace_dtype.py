"""The error a narrower trace dtype adds to each estimator's gradient, against its float32 trace.

For every registered estimator that serves the cell (with its example options), a float32 model runs
``T`` steps of one stream three times with the same inputs, cotangents and keys: trace stored in
float32 (the reference), in bfloat16 and in float16 (``make_estimator(..., trace_dtype=...)``:
storage in the narrow dtype, each step computed in float32). Recorded per estimator: the stored
trace's bytes against float32's, and the relative error of the per-step gradient
``‖g_dtype - g_float32‖ / ‖g_float32‖`` (median and largest over the steps), beside the estimator's
own relative error against exact RTRL's float32 gradient (median), which says how much the rounding
matters next to the estimator's approximation. The unit roundoffs are ``2^-8 ≈ 3.9e-3`` (bfloat16)
and ``2^-11 ≈ 4.9e-4`` (float16).

Usage::

    python benchmarks/trace_dtype.py                        # tanh RNN and GRU, n = 32, T = 200
    python benchmarks/trace_dtype.py --cells gru --hidden 64 --steps 500 --out results/x.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rtrl_jax as rj  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

INPUT = 4
CELLS = {"tanh": nn.SimpleCell, "gru": nn.GRUCell}
DTYPES = ("bfloat16", "float16")


def _flat(tree):
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)])


def gradients(estimator, core, params, carry, xs, cotangents, key):
    """``(T, P)`` per-step gradients ``c_t · J_t`` of ``estimator`` over one stream."""
    keys = jax.random.split(key, xs.shape[0] + 1)

    def body(state, step):
        carry, trace = state
        x, c, k = step
        carry, _, trace = estimator.step(trace, params, carry, x, key=k)
        return (carry, trace), _flat(estimator.grad(trace, params, c))

    trace = estimator.init(params, carry, key=keys[0])
    return jax.lax.scan(body, (carry, trace), (xs, cotangents, keys[1:]))[1]


def relative_errors(estimate, reference):
    """Per-step ``‖estimate - reference‖ / ‖reference‖`` (steps with a zero reference left out)."""
    num = np.linalg.norm(np.asarray(estimate) - np.asarray(reference), axis=-1)
    den = np.linalg.norm(np.asarray(reference), axis=-1)
    return num[den > 0] / den[den > 0]


def run_cell(cell, hidden, steps, seed):
    core = rj.from_linen(CELLS[cell](features=hidden), INPUT, name=cell)
    params, carry = core.init(jax.random.PRNGKey(seed))
    xs = jax.random.normal(jax.random.PRNGKey(seed + 1), (steps, INPUT), jnp.float32)
    cotangents = jax.random.normal(jax.random.PRNGKey(seed + 2), (steps, hidden), jnp.float32)
    key = jax.random.PRNGKey(seed + 3)
    exact = jax.jit(lambda: gradients(rj.rtrl(core), core, params, carry, xs, cotangents, key))()
    rows = []
    for info in rj.registered():
        if info.unsupported_reason(core) is not None:
            continue
        options = dict(info.example_options)
        builds = {None: rj.make_estimator(info.name, core, **options)}
        builds.update({d: rj.make_estimator(info.name, core, trace_dtype=d, **options) for d in DTYPES})
        grads = jax.jit(
            lambda builds=builds: {
                str(d): gradients(est, core, params, carry, xs, cotangents, key) for d, est in builds.items()
            }
        )()
        reference = grads["None"]
        wide_bytes = rj.trace_bytes(builds[None], params, carry)
        row = {
            "cell": cell,
            "estimator": info.name,
            "options": options,
            "own_error_median": float(np.median(relative_errors(reference, exact))),
            "trace_bytes_float32": wide_bytes,
        }
        for d in DTYPES:
            errors = relative_errors(grads[d], reference)
            row[f"{d}_bytes_ratio"] = rj.trace_bytes(builds[d], params, carry) / wide_bytes
            row[f"{d}_error_median"] = float(np.median(errors))
            row[f"{d}_error_max"] = float(np.max(errors))
        rows.append(row)
        print(_markdown_row(row), flush=True)
    return rows


HEADER = (
    "| cell | estimator | trace (float32) | bf16 bytes | bf16 error median / max | f16 bytes"
    " | f16 error median / max | estimator's own error (median) |\n|---|---|---|---|---|---|---|---|"
)


def _markdown_row(row):
    cells = [row["cell"], row["estimator"], f"{row['trace_bytes_float32']} B"]
    for d in DTYPES:
        cells += [
            f"{row[f'{d}_bytes_ratio']:.2f}×",
            f"{row[f'{d}_error_median']:.1e} / {row[f'{d}_error_max']:.1e}",
        ]
    return "| " + " | ".join([*cells, f"{row['own_error_median']:.1e}"]) + " |"


def main(argv=None):
    parser = _report.parser(__doc__)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(HEADER)
    rows = [row for cell in args.cells for row in run_cell(cell, args.hidden, args.steps, args.seed)]
    details = f"n = {args.hidden}, T = {args.steps}, seed {args.seed}"
    table = "\n".join([HEADER, *(_markdown_row(r) for r in rows)])
    _report.write(args.out, "trace_dtype.py", argv, _report.environment(details), table, rows)


if __name__ == "__main__":
    main()
