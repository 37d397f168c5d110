"""A Python-driven online loop against JAX's dispatch floor, as ratios measured in one run.

For each estimator, a batch of ``B`` streams of a GRU (``n`` units, float32, Adam, linear head)
trains online with :func:`rtrl_jax.live_step`: one jitted call of the whole train step per time
step, the state donated. Timed per step, over ``T`` steps:

- ``numpy``: the loop fed NumPy arrays (one ``(B, input)`` and one ``(B, classes)`` array per step);
- ``device``: the loop fed arrays already on the device;
- ``floor``: a trivial jitted function with the same arguments (the same state, inputs and targets,
  hence the same number of argument leaves), returning the donated state unchanged: what JAX's
  dispatch costs for those leaves with no arithmetic;
- ``scan``: the same train step inside one ``jax.lax.scan`` (its arithmetic alone, no dispatch).

Each of the three loops is run ``--rounds`` times, interleaved; the table gives the best round of
each and the median over rounds of ``numpy / floor`` and ``device / floor`` (within a round).

Usage::

    python benchmarks/online_loop.py                               # n = 32, B = 1, T = 500
    python benchmarks/online_loop.py --hidden 64 --batch 8 --estimators rtrl uoro --out results/x.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rtrl_jax as rj  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

INPUT = 4
CLASSES = 3
OPTIONS = {"rflo": {"leak": 0.9}}


def _loop(step, state, xs, ys):
    start = time.perf_counter()
    for x, y in zip(xs, ys, strict=True):
        state, _ = step(state, x, y)
    jax.block_until_ready(state)
    return state, (time.perf_counter() - start) / len(xs)


def bench(name, hidden, batch, steps, rounds, seed=0):
    core = rj.from_linen(nn.GRUCell(features=hidden), INPUT)
    estimator = rj.make_estimator(name, core, **OPTIONS.get(name, {}))
    optimizer = optax.adam(1e-3)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    params, _ = core.init(keys[0])
    head = rj.linear_head().init(keys[1], hidden, CLASSES)
    state = rj.init_train_state(core, estimator, optimizer, params, head, batch_size=batch, key=keys[2])
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, batch, INPUT), dtype=np.float32)
    ys = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, (steps, batch))]
    device_xs, device_ys = list(jax.device_put(xs)), list(jax.device_put(ys))
    numpy_xs, numpy_ys = list(xs), list(ys)

    train_step = rj.make_train_step(core, estimator, optimizer)
    step = rj.live_step(train_step)
    floor = jax.jit(lambda state, x, y: (state, None), donate_argnums=0)

    @jax.jit
    def scanned(state, xs, ys):
        def body(state, xy):
            x, y = xy
            mask, reset = jnp.ones((batch,), jnp.float32), jnp.zeros((batch,), bool)
            return train_step(state, rj.Stream(x, y, mask, reset))[0], None

        return jax.lax.scan(body, state, (xs, ys))[0]

    leaves = len(jax.tree.leaves((state, xs[0], ys[0])))
    state, _ = _loop(step, state, numpy_xs[:3], numpy_ys[:3])  # compile
    state, _ = _loop(floor, state, numpy_xs[:3], numpy_ys[:3])
    jax.block_until_ready(scanned(jax.tree.map(jnp.copy, state), xs, ys))
    times = {"numpy": [], "device": [], "floor": [], "scan": []}
    for _ in range(rounds):
        state, t = _loop(step, state, numpy_xs, numpy_ys)
        times["numpy"].append(t)
        state, t = _loop(step, state, device_xs, device_ys)
        times["device"].append(t)
        state, t = _loop(floor, state, device_xs, device_ys)
        times["floor"].append(t)
        start = time.perf_counter()
        jax.block_until_ready(scanned(state, xs, ys))
        times["scan"].append((time.perf_counter() - start) / steps)
    times = {k: np.array(v) for k, v in times.items()}
    return {
        "estimator": name,
        "hidden": hidden,
        "batch": batch,
        "argument_leaves": leaves,
        **{f"{k}_us": float(v.min() * 1e6) for k, v in times.items()},
        "numpy_over_floor": float(np.median(times["numpy"] / times["floor"])),
        "device_over_floor": float(np.median(times["device"] / times["floor"])),
    }


HEADER = (
    "| estimator | n | B | arg leaves | numpy µs | device µs | floor µs | scan µs | numpy / floor"
    " | device / floor |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _row(r):
    return (
        f"| {r['estimator']} | {r['hidden']} | {r['batch']} | {r['argument_leaves']} | {r['numpy_us']:.0f}"
        f" | {r['device_us']:.0f} | {r['floor_us']:.0f} | {r['scan_us']:.0f} | {r['numpy_over_floor']:.2f}"
        f" | {r['device_over_floor']:.2f} |"
    )


def main(argv=None):
    parser = _report.parser(__doc__)
    parser.add_argument("--estimators", nargs="+", default=["rtrl", "uoro", "kf", "rflo", "snap"])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(HEADER)
    rows = []
    for name in args.estimators:
        rows.append(bench(name, args.hidden, args.batch, args.steps, args.rounds))
        print(_row(rows[-1]), flush=True)
    details = f"T = {args.steps} steps, {args.rounds} rounds"
    table = "\n".join([HEADER, *map(_row, rows)])
    _report.write(args.out, "online_loop.py", argv, _report.environment(details), table, rows)


if __name__ == "__main__":
    main()
