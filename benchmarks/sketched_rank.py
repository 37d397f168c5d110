"""Error of low-rank sketched RTRL (SK-RTRL) against its rank, with its running bound.

One GRU (``flax.linen.GRUCell``, ``n`` units, 4 inputs, default initialisation, zero initial carry) on
one fixed random input stream of ``T`` steps, float64, parameters frozen. For each rank ``r``
(``0`` = SnAp-1, up to the carry size ``S = n`` = exact RTRL) SK-RTRL's influence ``Ĵ_t``
(:func:`rtrl_jax.influence_matrix` of its trace) is compared at every step with exact RTRL's ``J_t``
(the same, of an ``rtrl`` trace, on the same stream): the table holds the relative Frobenius error
``‖J_T − Ĵ_T‖_F / ‖J_T‖_F`` at the last step, the trace's running bound ``e_T`` over ``‖J_T‖_F``,
the error averaged over the steps, and whether ``e_t ≥ ‖J_t − Ĵ_t‖_F`` held at every step.

Usage::

    python benchmarks/sketched_rank.py [--hidden 16] [--steps 100] [--ranks 0 1 2 4 16]
        [--seed 0] [--out benchmarks/results]

Writes ``sketched_rank.json`` and ``sketched_rank.md`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import rtrl_jax

INPUT_SIZE = 4


def influences(core, estimator, params, carry, inputs):
    """``(T, S, P)`` influence matrices after every step and ``(T,)`` bounds (zeros without one)."""

    def emit(h, out, trace):
        bound = getattr(trace, "bound", jnp.zeros((), jnp.float64))
        return rtrl_jax.influence_matrix(estimator, trace, params, h), bound

    return jax.jit(lambda: rtrl_jax.rollout(estimator, params, carry, inputs, emit=emit)[2])()


def run(hidden: int, steps: int, ranks: list[int], seed: int = 0) -> dict:
    core = rtrl_jax.from_linen(nn.GRUCell(features=hidden), INPUT_SIZE)
    params, carry = core.init(jax.random.PRNGKey(seed), dtype=jnp.float64)
    inputs = jax.random.normal(jax.random.PRNGKey(seed + 1), (steps, INPUT_SIZE), jnp.float64)
    exact, _ = influences(core, rtrl_jax.rtrl(core), params, carry, inputs)
    exact_norm = np.sqrt(np.sum(np.asarray(exact) ** 2, axis=(1, 2)))
    snap1, _ = influences(core, rtrl_jax.snap(core, 1), params, carry, inputs)
    rows = []
    for rank in ranks:
        estimate, bound = influences(core, rtrl_jax.sketched_rtrl(core, rank), params, carry, inputs)
        error = np.sqrt(np.sum((np.asarray(estimate) - np.asarray(exact)) ** 2, axis=(1, 2)))
        bound = np.asarray(bound)
        rows.append(
            {
                "rank": rank,
                "relative_error_T": float(error[-1] / exact_norm[-1]),
                "relative_bound_T": float(bound[-1] / exact_norm[-1]),
                "relative_error_mean": float(np.mean(error / exact_norm)),
                "bound_holds_every_step": bool(np.all(bound >= error - 1e-10 * exact_norm)),
                "max_abs_diff_from_snap1": float(np.max(np.abs(np.asarray(estimate) - np.asarray(snap1)))),
                "max_abs_diff_from_exact": float(np.max(np.abs(np.asarray(estimate) - np.asarray(exact)))),
            }
        )
        print(rows[-1], flush=True)
    return {
        "cell": "gru",
        "hidden": hidden,
        "carry_size": int(core.carry_size),
        "num_params": int(exact.shape[-1]),
        "steps": steps,
        "input_size": INPUT_SIZE,
        "seed": seed,
        "dtype": "float64",
        "exact_norm_T": float(exact_norm[-1]),
        "rows": rows,
    }


def markdown(result: dict, command: str, env: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Device and versions: {env}",
        "",
        f"SK-RTRL against exact RTRL: GRU n={result['hidden']} (S={result['carry_size']}, "
        f"P={result['num_params']}), {result['input_size']} Gaussian inputs, {result['steps']} steps, "
        f"frozen parameters (seed {result['seed']}), {result['dtype']}; "
        f"‖J_T‖_F = {result['exact_norm_T']:.4g}.",
        "",
        "| rank r | ‖J_T − Ĵ_T‖_F / ‖J_T‖_F | bound e_T / ‖J_T‖_F | mean_t ‖J_t − Ĵ_t‖_F / ‖J_t‖_F "
        "| bound ≥ error at every step | max abs Ĵ_T − SnAp-1 |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        label = f"{row['rank']}"
        if row["rank"] == 0:
            label += " (SnAp-1)"
        elif row["rank"] >= result["carry_size"]:
            label += " (full)"
        lines.append(
            f"| {label} | {row['relative_error_T']:.4g} | {row['relative_bound_T']:.4g} "
            f"| {row['relative_error_mean']:.4g} | {'yes' if row['bound_holds_every_step'] else 'no'} "
            f"| {row['max_abs_diff_from_snap1']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 1, 2, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    result = run(args.hidden, args.steps, args.ranks, args.seed)
    device = jax.devices()[0]
    env = (
        f"{device.platform} ({device.device_kind}), jax {jax.__version__}, flax {flax.__version__}, "
        f"numpy {np.__version__}, python {platform.python_version()}"
    )
    command = " ".join(["python", "benchmarks/sketched_rank.py", *map(shlex.quote, sys.argv[1:])])
    result["command"] = command
    result["environment"] = env
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sketched_rank.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, command, env)
    (out / "sketched_rank.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
