"""Variance of the stochastic RTRL approximations against network size (as in the KF-RTRL and OK papers).

For a tanh RNN (``flax.linen.SimpleCell``, ``n`` units, 4 inputs, default initialisation: orthogonal
recurrent kernel) on one fixed random trajectory of ``T`` steps (learning rate 0, float64), each
estimator is run with ``K`` independent keys and its final influence ``J̃_T`` compared with exact
RTRL's ``J_T``: the table holds the relative variance ``E‖J̃_T − J_T‖² / ‖J_T‖²``.

Usage::

    python benchmarks/variance_vs_n.py [--sizes 8 16 32] [--steps 30] [--keys 200] [--out benchmarks/results]

Writes ``influence_variance_vs_n.json`` and ``influence_variance_vs_n.md`` into ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

import rtrl_jax
from rtrl_jax._src import estimator_stats

ESTIMATORS = {
    "UORO": lambda core: rtrl_jax.uoro(core),
    "KF": lambda core: rtrl_jax.kf_rtrl(core),
    "1-OK": lambda core: rtrl_jax.ok(core, rank=1),
    "2-OK": lambda core: rtrl_jax.ok(core, rank=2),
    "4-OK": lambda core: rtrl_jax.ok(core, rank=4),
}
INPUT_SIZE = 4
# Keys per vmapped chunk (jax.lax.map), which bounds the memory of the sampled influences.
BATCH = 25


def relative_variances(n: int, steps: int, num_keys: int, seed: int = 0) -> dict[str, float]:
    core = rtrl_jax.from_linen(nn.SimpleCell(features=n), INPUT_SIZE)
    params, carry = core.init(jax.random.PRNGKey(seed), dtype=jnp.float64)
    inputs = jax.random.normal(jax.random.PRNGKey(seed + 1), (steps, INPUT_SIZE), jnp.float64)
    exact = jax.jit(lambda k: estimator_stats.final_influence(rtrl_jax.rtrl(core), params, carry, inputs, k))(
        jax.random.PRNGKey(0)
    )
    keys = jax.random.split(jax.random.PRNGKey(seed + 2), num_keys)
    result = {}
    for name, make in ESTIMATORS.items():
        est = make(core)
        sample = jax.jit(
            lambda k, est=est: estimator_stats.relative_variance(
                estimator_stats.sample_final_influences(est, params, carry, inputs, k, batch_size=BATCH),
                exact,
            )
        )
        result[name] = float(sample(keys))
        print(f"  n={n} {name}: {result[name]:.4g}", flush=True)
    return result


def markdown(rows: dict[int, dict[str, float]], meta: dict) -> str:
    names = list(ESTIMATORS)
    lines = [
        "| n | " + " | ".join(names) + " | UORO/KF |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for n, row in rows.items():
        cells = " | ".join(f"{row[name]:.4g}" for name in names)
        lines.append(f"| {n} | {cells} | {row['UORO'] / row['KF']:.3g} |")
    lines += [
        "",
        f"Relative variance E‖J̃−J‖²/‖J‖² after T={meta['steps']} steps over {meta['keys']} keys,"
        f" tanh RNN (SimpleCell, {INPUT_SIZE} inputs), float64. Device: {meta['device']};"
        f" jax {meta['jax']}; {meta['seconds']:.0f} s. Command: `{meta['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    start = time.time()
    rows = {}
    for n in args.sizes:
        rows[n] = relative_variances(n, args.steps, args.keys)
        print(n, rows[n], flush=True)
    device = jax.devices()[0]
    meta = {
        "steps": args.steps,
        "keys": args.keys,
        "device": f"{device.platform} ({device.device_kind}, {platform.processor() or platform.machine()})",
        "jax": jax.__version__,
        "seconds": time.time() - start,
        "command": "python benchmarks/variance_vs_n.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "influence_variance_vs_n.json").write_text(
        json.dumps({"meta": meta, "relative_variance": rows}, indent=2) + "\n"
    )
    table = markdown(rows, meta)
    (args.out / "influence_variance_vs_n.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
