"""Memory before allocation: the bytes of a trace, a train state, and what the machine has free.

Everything here works on shapes: :func:`trace_bytes` asks ``jax.eval_shape`` for the trace that
``estimator.init`` would build, so it costs one abstract trace of ``init`` and allocates nothing.
That makes it safe for a model whose trace would not fit (exact RTRL's influence matrix grows as
``S × P``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rtrl_jax._src.base import Estimator, Params


def tree_bytes(tree: Any) -> int:
    """The bytes of the leaves of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return sum(
        math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    )


def abstract_bytes(make: Callable[[], Any]) -> int:
    """The bytes of what ``make()`` returns, found by ``jax.eval_shape`` without allocating it."""
    return tree_bytes(jax.eval_shape(make))


def trace_bytes(estimator: Estimator, params: Params, carry: Any, batch_size: int = 1) -> int:
    """The bytes of ``batch_size`` traces of ``estimator`` for a core's ``params`` and ``carry``.

    Args:
      estimator: any estimator (``init`` is traced abstractly, never run).
      params: the core's parameters (arrays or ``jax.ShapeDtypeStruct``).
      carry: one stream's carry (arrays or ``jax.ShapeDtypeStruct``).
      batch_size: the number of streams.

    Returns:
      ``batch_size`` times the bytes of one trace.

    Example::

        params, carry = core.init(jax.random.PRNGKey(0))
        trace_bytes(rtrl_jax.make_estimator("rtrl", core), params, carry, batch_size=8)
    """
    one = jax.eval_shape(lambda p, c: estimator.init(p, c, key=jax.random.PRNGKey(0)), params, carry)
    return batch_size * tree_bytes(one)


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """Bytes from ``"8GiB"``, ``"512 MB"``, ``"1e9"`` or an integer (units: B, kB, MB, GB, TB, KiB,
    MiB, GiB, TiB; case-insensitive).

    Raises:
      ValueError: naming the text and the form expected.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match and match.group(2) in _UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(
        f"{text!r} is not a memory size; expected a positive number of bytes with an optional unit,"
        f" e.g. 8GiB, 512MB, 1e9 (units: {', '.join(u for u in _UNITS if u)})."
    )


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def available_memory(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The memory free for a new run on JAX's default device, in bytes, or ``None`` if unknown.

    An accelerator reports its own (``bytes_limit - bytes_in_use``); on the CPU it is the host's
    ``MemAvailable`` from ``meminfo``.
    """
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
