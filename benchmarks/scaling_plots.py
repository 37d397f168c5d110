"""Plots against the network size n: step time (from speed_memory.json) and gradient quality.

`python benchmarks/scaling_plots.py [--sizes 8 16 32] [--steps 400] [--keys 8]` writes
- `benchmarks/results/time_vs_n.png`: per-step time of every estimator against n (log-log) from the
  `benchmarks/results/speed_memory.json` (written by `python benchmarks/speed_memory.py --large`),
  with n² and n⁴ guides;
- `benchmarks/results/variance_vs_n.{json,md,png}`: relative variance, squared bias and per-step
  cosine with exact RTRL against n, from `rtrl_jax.compare_gradients` on the add task (tanh RNN,
  frozen parameters, float64).
"""

import argparse
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import rtrl_jax  # noqa: E402
from rtrl_jax._src.tasks import add_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def time_vs_n(path: Path, out: Path) -> None:
    data = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, cell in zip(axes, ("tanh", "gru"), strict=True):
        by_est: dict[str, list] = {}
        for row in data["rows"]:
            if row["cell"] == cell and row.get("batch", 1) == 1:
                by_est.setdefault(row["estimator"], []).append((row["n"], row["step_s"] * 1e3))
        for est, points in by_est.items():
            n, ms = zip(*sorted(points), strict=True)
            ax.plot(
                n, ms, marker="o", label=f"{est} (slope {data['exponents'].get(f'{est}/{cell}', np.nan):.1f})"
            )
        ns = np.array([32, 256])
        ax.plot(ns, 0.2 * (ns / 32) ** 4, "k:", lw=0.8, label="∝ n⁴")
        ax.plot(ns, 0.05 * (ns / 32) ** 2, "k--", lw=0.8, label="∝ n²")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden units n")
        ax.set_title(f"{cell} cell: online step time ({data['device']})")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ms per step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_variance(rows: dict, path: Path) -> None:
    """Variance (estimators with noise only) and per-step cosine against n."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, by_n in rows.items():
        ns = sorted(by_n, key=int)
        if any(by_n[n]["variance"] > 0 for n in ns):
            axes[0].plot([int(n) for n in ns], [by_n[n]["variance"] for n in ns], marker="o", label=name)
        axes[1].plot([int(n) for n in ns], [by_n[n]["cosine@1"] for n in ns], marker="o", label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("relative variance E‖g̃ − ḡ‖² / ‖g‖²")
    axes[1].set_ylabel("per-step cosine with exact RTRL")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden units n (tanh RNN, add task, frozen)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def variance_vs_n(sizes, steps, keys, out_stem: Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    task = add_task()
    stream = task.sample(jax.random.PRNGKey(0), steps)
    rows = {}
    for n in sizes:
        core = rtrl_jax.from_linen(nn.SimpleCell(features=n), task.input_size)
        params, carry = core.init(jax.random.PRNGKey(1), jnp.float64)
        head = rtrl_jax.linear_head()
        head_params = head.init(jax.random.PRNGKey(2), n, task.num_classes, jnp.float64)

        def loss_fn(out, target, head=head, head_params=head_params):
            return rtrl_jax.softmax_cross_entropy(head.apply(head_params, out), target)

        estimators = {
            "uoro": rtrl_jax.uoro(core),
            "kf": rtrl_jax.kf_rtrl(core),
            "ok": rtrl_jax.ok(core, rank=1),
            "ok2": rtrl_jax.ok(core, rank=2),
            "snap": rtrl_jax.snap(core),
        }
        result = rtrl_jax.compare_gradients(
            core,
            estimators,
            rtrl_jax.rtrl(core),
            params,
            carry,
            stream.inputs.astype(jnp.float64),
            stream.targets.astype(jnp.float64),
            loss_fn,
            keys=jax.random.split(jax.random.PRNGKey(3), keys),
            windows=(1,),
        )
        for name, entry in result.summary.items():
            rows.setdefault(name, {})[n] = entry
    plot_variance(rows, out_stem.with_suffix(".png"))
    lines = [
        "| estimator | " + " | ".join(f"n={n}: variance / bias2 / cosine" for n in sizes) + " |",
        "|---" * (len(sizes) + 1) + "|",
    ]
    for name, by_n in rows.items():
        cells = [
            f"{by_n[n]['variance']:.3g} / {by_n[n]['bias2']:.2g} / {by_n[n]['cosine@1']:.3f}" for n in sizes
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    doc = {
        "sizes": list(sizes),
        "steps": steps,
        "keys": keys,
        "device": str(jax.devices()[0].platform),
        "jax_version": jax.__version__,
        "results": {k: {str(n): e for n, e in v.items()} for k, v in rows.items()},
    }
    out_stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--speed-json", default=str(RESULTS / "speed_memory.json"))
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if Path(args.speed_json).is_file():
        time_vs_n(Path(args.speed_json), RESULTS / "time_vs_n.png")
        print(f"wrote {RESULTS / 'time_vs_n.png'}")
    else:
        print(f"no {args.speed_json}: run benchmarks/speed_memory.py first for the time plot")
    variance_vs_n(args.sizes, args.steps, args.keys, RESULTS / "variance_vs_n")
    print((RESULTS / "variance_vs_n.md").read_text())


if __name__ == "__main__":
    main()
