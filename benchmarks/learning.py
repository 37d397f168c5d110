"""Learning benchmarks: `python benchmarks/learning.py configs/bench_<name>.yaml [key=value ...] [--out DIR]`.

Writes `<name>.json`, `<name>.md` (the table) and `<name>.png` (learning curves) into DIR (default
`benchmarks/results/`). See `rtrl_jax/_src/benchmarks_learning.py` for the benchmarks.
"""

import argparse
import sys
from pathlib import Path

from rtrl_jax._src.benchmarks_learning import load_benchmark_config, run_benchmark
from rtrl_jax._src.config import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a configs/bench_*.yaml file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (flat keys)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    try:
        cfg = load_benchmark_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"learning.py: invalid configuration: {error}", file=sys.stderr)
        return 2
    document = run_benchmark(cfg, args.out)
    name = document["benchmark"]
    print((Path(args.out) / f"{name}.md").read_text())
    print(
        f"{document['device']}, jax {document['jax_version']}, {document['wall_s']:.0f} s;"
        f" wrote {args.out}/{name}.json, .md, .png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
