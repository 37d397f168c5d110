"""The run record every benchmark table carries: the command, the device and versions, the table."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import jax


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--out`` (the markdown table's path)."""
    result = argparse.ArgumentParser(description=doc.splitlines()[0])
    result.add_argument(
        "--out", type=Path, default=None, help="write the markdown table (and .json beside it)"
    )
    return result


def environment(details: str) -> str:
    """One line: device, backend, jax and Python versions, then the run's ``details``."""
    return (
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__},"
        f" Python {platform.python_version()}; {details}"
    )


def write(
    out: Path | None, script: str, argv: Sequence[str] | None, env: str, table: str, rows: list | None = None
) -> None:
    """Prints ``env``; with ``out``, writes the command, ``env`` and the markdown ``table`` there (and
    ``rows`` as JSON beside it, when given)."""
    print(env)
    if out is None:
        return
    command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(f"`{command.strip()}`\n\n{env}\n\n{table}\n")
    if rows is not None:
        out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
