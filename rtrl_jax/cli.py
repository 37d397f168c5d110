"""The ``rtrl-jax`` command line, a thin parser over :mod:`rtrl_jax.experiment`.

- ``rtrl-jax train [CONFIG] [key=value ...] [--out DIR]``: an online training job (the embedded
  default without CONFIG: copy task, a small GRU, exact RTRL; ``model.layers=2`` and the other
  ``model.*`` keys make a whole model of online layers). Ctrl-C or SIGTERM saves a checkpoint;
  ``rtrl-jax train --resume RUN_DIR`` continues the run from its newest good checkpoint.
- ``rtrl-jax plot RUN_DIR``: PNG learning curves of a run folder.
- ``rtrl-jax estimators``: the registered estimators, their options and the cells each can serve
  (and the options a cell needs).
- ``rtrl-jax config [CONFIG] [key=value ...]``: the train config with every default filled in.
- ``rtrl-jax compare [CONFIG] [key=value ...] [--out DIR]``: gradient quality of estimators against
  an exact-RTRL shadow on one shared trajectory (JSON, markdown table, PNG).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import sys
from pathlib import Path

from rtrl_jax import experiment
from rtrl_jax.experiment import ConfigError
from rtrl_jax.experiment.options import config_yaml, estimator_listing


def _default_out(config: experiment.RunConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.task}-{config.estimator}"


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.resume:
        if args.config or args.overrides or args.out:
            raise ConfigError(
                "--resume RUN_DIR takes the run's own config.yaml; drop the CONFIG, key=value"
                " overrides and --out (a changed config would not continue the same run)."
            )
        out_dir = Path(args.resume)
        if not (out_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {str(out_dir)!r} is not a run folder (no config.yaml).")
        config = experiment.load_config(out_dir / "config.yaml")
    else:
        config = experiment.load_config(args.config, args.overrides)
        out_dir = Path(args.out) if args.out else _default_out(config)
    built = experiment.build(config)
    model = f"cell={config.model.cell} hidden={config.model.hidden} estimator={config.estimator}"
    if built.model is not None:
        model = " ".join(f"{layer.cell}/{layer.hidden}/{layer.estimator}" for layer in built.layers)
        model = f"layers={len(built.layers)} ({model})"
    print(
        f"rtrl-jax train: task={config.task} {model} steps={config.train.steps}"
        f" batch={config.train.batch_size} -> {out_dir}{' (resume)' if args.resume else ''}",
        flush=True,
    )
    if built.memory is not None:
        print(built.memory.describe(), flush=True)
    # the bar shows the run's own steps/s (compiling excluded), not tqdm's rate and time left; it
    # starts at the step the run starts from (a resumed run's checkpoint)
    bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    progress = {}

    def on_start(step):
        progress["bar"] = tqdm(
            total=config.train.steps, initial=step, disable=args.quiet, file=sys.stderr, bar_format=bar_format
        )

    def on_chunk(steps_done, info):
        bar = progress["bar"]
        bar.update(steps_done - bar.n)
        postfix = {"loss": f"{info['loss']:.4f}"}
        if math.isfinite(info["steps_per_s"]):
            postfix["steps/s"] = f"{info['steps_per_s']:.0f}"
        if info.get("nonfinite"):
            postfix["nonfinite"] = info["nonfinite"]
        bar.set_postfix(postfix)

    try:
        summary = experiment.run_training(
            built, out_dir, on_chunk=on_chunk, on_start=on_start, resume=bool(args.resume)
        )
    except experiment.RunError as error:
        print(f"rtrl-jax: {error}", file=sys.stderr)
        return 2
    finally:
        if "bar" in progress:
            progress["bar"].close()
    print(json.dumps(summary, indent=2))
    print(f"run folder: {out_dir}")
    if summary["status"] == "interrupted":
        print(
            f"interrupted at step {summary['steps']} (checkpoint saved);"
            f" continue with: rtrl-jax train --resume {out_dir}",
            file=sys.stderr,
        )
        return 130
    if summary["status"] == "stopped_nonfinite":
        print(f"rtrl-jax: stopped: {summary['stop']['message']}", file=sys.stderr)
        return 3
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        path = experiment.plot_run(args.run_dir, args.out)
    except FileNotFoundError as error:
        print(f"rtrl-jax: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _estimators(args: argparse.Namespace) -> int:
    del args
    print(estimator_listing())
    return 0


def _config(args: argparse.Namespace) -> int:
    print(config_yaml(experiment.load_config(args.config, args.overrides)), end="")
    return 0


def _compare(args: argparse.Namespace) -> int:
    config = experiment.load_compare_config(args.config, args.overrides)
    job = experiment.build(config)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path("runs") / f"{stamp}-compare-{config.task}"
    document = experiment.run_compare(job, out_dir)
    print((out_dir / "compare.md").read_text())
    print(f"wrote {out_dir / 'compare.json'}, compare.md, compare.png ({document['wall_s']:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n\n")[0].replace(":mod:", "").replace("`", "")
    parser = argparse.ArgumentParser(prog="rtrl-jax", description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="run an online training job",
        epilog="config keys and their defaults: rtrl-jax config; estimator and task options:"
        " rtrl-jax estimators, docs/options.md",
    )
    train.add_argument("config", nargs="?", help="a YAML config (default: the embedded one)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.add_argument("--out", help="run folder (default: runs/<time>-<task>-<estimator>)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest good checkpoint")
    train.set_defaults(run=_train)
    plot = commands.add_parser("plot", help="PNG learning curves of a run folder")
    plot.add_argument("run_dir", help="a run folder (with metrics.jsonl)")
    plot.add_argument("--out", help="the PNG (default: RUN_DIR/learning_curves.png)")
    plot.set_defaults(run=_plot)
    estimators = commands.add_parser(
        "estimators", help="list estimators, their options and the cells they serve"
    )
    estimators.set_defaults(run=_estimators)
    config = commands.add_parser("config", help="print a train config with every default filled in")
    config.add_argument("config", nargs="?", help="a YAML config (default: the embedded one)")
    config.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    config.set_defaults(run=_config)
    compare = commands.add_parser("compare", help="gradient quality of estimators against exact RTRL")
    compare.add_argument("config", nargs="?", help="a YAML comparison config (default: the embedded one)")
    compare.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    compare.add_argument("--out", help="output folder (default: runs/<time>-compare-<task>)")
    compare.set_defaults(run=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, in the handler below, not at exit
        return status
    except ConfigError as error:
        print(f"rtrl-jax: invalid configuration: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader closed the pipe (`rtrl-jax estimators | head -1`): stop quietly. What is left
        # in the buffer goes to /dev/null, so that flushing it at exit raises nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
