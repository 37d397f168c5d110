"""A Python-driven online loop against JAX's dispatch floor, as ratios measured in one run.

For each estimator, a batch of ``B`` streams of a GRU (``n`` units, float32, Adam, linear head)
trains online with :func:`rtrl_jax.live_step`: one jitted call of the whole train step per time
step, the state donated. Timed per step, over ``T`` steps:

- ``packed numpy``: the recommended loop, the state packed by :func:`rtrl_jax.pack_state` (one flat
  buffer per dtype), fed NumPy arrays (one ``(B, input)`` and one ``(B, classes)`` array per step);
- ``packed device``: the same loop fed arrays already on the device;
- ``packed floor``: a trivial jitted function with the same arguments (the packed state, an input
  and a target array, hence the same argument leaves), returning the donated state unchanged: what
  JAX's dispatch costs for those leaves with no arithmetic;
- ``plain device`` and ``plain floor``: the loop and its floor on the unpacked state (one argument
  per leaf of the train state);
- ``scan``: the same train step inside one ``jax.lax.scan`` (its arithmetic alone, no dispatch).

``scan / floor`` is the least ratio to the floor that any per-step loop of this step can reach
(its arithmetic, at no launch or dispatch cost); ``(packed device − scan) / floor`` is what the
per-step call adds to the arithmetic, in units of the floor.

The loops are run ``--rounds`` times, interleaved; the table gives the best round of each and the
median over rounds of each loop's ratio to its floor (within a round). ``--sync-dispatch`` turns
off JAX's asynchronous CPU dispatch (``jax_cpu_enable_async_dispatch``) for the whole run;
``--cpus k`` pins the process to ``k`` of its CPUs before JAX starts (XLA:CPU sizes its thread pool
from them).

Usage::

    python benchmarks/online_loop.py                               # n = 32, B = 1, T = 300
    python benchmarks/online_loop.py --hidden 64 --batch 8 --estimators rtrl uoro --out results/x.md
"""

from __future__ import annotations

import os
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


def _floor(state, x, y):
    return state, None


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
    floor = jax.jit(_floor, donate_argnums=0)

    @jax.jit
    def scanned(state, xs, ys):
        def body(state, xy):
            x, y = xy
            mask, reset = jnp.ones((batch,), jnp.float32), jnp.zeros((batch,), bool)
            return train_step(state, rj.Stream(x, y, mask, reset))[0], None

        return jax.lax.scan(body, state, (xs, ys))[0]

    packed = rj.pack_state(state)
    leaves = len(jax.tree.leaves((state, xs[0], ys[0])))
    packed_leaves = len(jax.tree.leaves((packed, xs[0], ys[0])))
    for loop_step in (step, floor):  # compile
        state, _ = _loop(loop_step, state, numpy_xs[:3], numpy_ys[:3])
        packed, _ = _loop(loop_step, packed, numpy_xs[:3], numpy_ys[:3])
    jax.block_until_ready(scanned(jax.tree.map(jnp.copy, state), xs, ys))
    times = {
        key: [] for key in ("packed_numpy", "packed_device", "packed_floor", "plain_device", "plain_floor")
    }
    times["scan"] = []
    for _ in range(rounds):
        packed, t = _loop(step, packed, numpy_xs, numpy_ys)
        times["packed_numpy"].append(t)
        packed, t = _loop(step, packed, device_xs, device_ys)
        times["packed_device"].append(t)
        packed, t = _loop(floor, packed, device_xs, device_ys)
        times["packed_floor"].append(t)
        state, t = _loop(step, state, device_xs, device_ys)
        times["plain_device"].append(t)
        state, t = _loop(floor, state, device_xs, device_ys)
        times["plain_floor"].append(t)
        start = time.perf_counter()
        jax.block_until_ready(scanned(state, xs, ys))
        times["scan"].append((time.perf_counter() - start) / steps)
    times = {k: np.array(v) for k, v in times.items()}
    return {
        "estimator": name,
        "hidden": hidden,
        "batch": batch,
        "argument_leaves": leaves,
        "packed_argument_leaves": packed_leaves,
        **{f"{k}_us": float(v.min() * 1e6) for k, v in times.items()},
        "packed_numpy_over_floor": float(np.median(times["packed_numpy"] / times["packed_floor"])),
        "packed_device_over_floor": float(np.median(times["packed_device"] / times["packed_floor"])),
        "plain_device_over_floor": float(np.median(times["plain_device"] / times["plain_floor"])),
        "packed_over_scan": float(np.median(times["packed_device"] / times["scan"])),
        "scan_over_floor": float(np.median(times["scan"] / times["packed_floor"])),
        "overhead_over_floor": float(
            np.median((times["packed_device"] - times["scan"]) / times["packed_floor"])
        ),
    }


HEADER = (
    "| estimator | n | B | leaves: plain / packed | packed numpy µs | packed device µs | packed floor µs"
    " | plain device µs | plain floor µs | scan µs | packed numpy / floor | packed device / floor"
    " | plain device / floor | packed device / scan | scan / floor | (packed device − scan) / floor |\n"
    + "|---" * 16
    + "|"
)


def _row(r):
    return (
        f"| {r['estimator']} | {r['hidden']} | {r['batch']}"
        f" | {r['argument_leaves']} / {r['packed_argument_leaves']}"
        f" | {r['packed_numpy_us']:.0f} | {r['packed_device_us']:.0f} | {r['packed_floor_us']:.1f}"
        f" | {r['plain_device_us']:.0f} | {r['plain_floor_us']:.0f} | {r['scan_us']:.0f}"
        f" | {r['packed_numpy_over_floor']:.1f} | {r['packed_device_over_floor']:.1f}"
        f" | {r['plain_device_over_floor']:.2f} | {r['packed_over_scan']:.2f}"
        f" | {r['scan_over_floor']:.1f} | {r['overhead_over_floor']:.1f} |"
    )


def main(argv=None):
    parser = _report.parser(__doc__)
    parser.add_argument("--estimators", nargs="+", default=["rtrl", "uoro", "kf", "rflo", "snap"])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sync-dispatch", action="store_true", help="jax_cpu_enable_async_dispatch off")
    parser.add_argument("--cpus", type=int, default=None, help="pin the process to this many CPUs")
    args = parser.parse_args(argv)
    if args.cpus is not None:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
    if args.sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    print(HEADER)
    rows = []
    for name in args.estimators:
        rows.append(bench(name, args.hidden, args.batch, args.steps, args.rounds))
        print(_row(rows[-1]), flush=True)
    dispatch = "synchronous" if args.sync_dispatch else "asynchronous"
    details = (
        f"T = {args.steps} steps, {args.rounds} rounds, {dispatch} CPU dispatch,"
        f" {len(os.sched_getaffinity(0))} CPUs"
    )
    table = "\n".join([HEADER, *map(_row, rows)])
    _report.write(args.out, "online_loop.py", argv, _report.environment(details), table, rows)


if __name__ == "__main__":
    main()
