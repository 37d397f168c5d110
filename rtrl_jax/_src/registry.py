"""The estimator registry: pick an estimator by name, with its options, for a given core."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from rtrl_jax._src import kronecker
from rtrl_jax._src.base import Estimator
from rtrl_jax._src.kf_rtrl import kf_rtrl
from rtrl_jax._src.ok import ok
from rtrl_jax._src.rflo import rflo
from rtrl_jax._src.rtrl import rtrl
from rtrl_jax._src.snap import snap, snap_unsupported_reason
from rtrl_jax._src.tbptt import tbptt
from rtrl_jax._src.uoro import uoro


class EstimatorInfo(NamedTuple):
    """A registered estimator.

    Attributes:
      name: the registry name (``"rtrl"``, ``"tbptt"``, ...).
      make: ``make(core, **options) -> Estimator``.
      summary: one line for listings.
      unsupported_reason: ``core -> str | None``: why the estimator cannot serve ``core``, or
        ``None`` when it can.
    """

    name: str
    make: Callable[..., Estimator]
    summary: str
    unsupported_reason: Callable[[Any], str | None]


_REGISTRY: dict[str, EstimatorInfo] = {}


def _serves_any(core: Any) -> str | None:
    del core
    return None


def register(
    name: str,
    make: Callable[..., Estimator],
    *,
    summary: str,
    unsupported_reason: Callable[[Any], str | None] = _serves_any,
) -> None:
    """Adds an estimator factory ``make(core, **options)`` to the registry under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"an estimator named {name!r} is already registered.")
    _REGISTRY[name] = EstimatorInfo(name, make, summary, unsupported_reason)


def registered() -> list[EstimatorInfo]:
    """Every registered estimator, in registration order."""
    return list(_REGISTRY.values())


def get_estimator_info(name: str) -> EstimatorInfo:
    """The registry entry for ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; known estimators: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def estimator_options(name: str) -> dict[str, Any]:
    """The keyword options of the estimator ``name`` with their defaults (``inspect.Parameter.empty``
    for required ones)."""
    signature = inspect.signature(get_estimator_info(name).make)
    return {
        p.name: p.default
        for p in list(signature.parameters.values())[1:]
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def make_estimator(name: str, core: Any, **options: Any) -> Estimator:
    """Builds the estimator ``name`` for ``core``.

    Raises:
      ValueError: for an unknown name, an unknown option, or an estimator that cannot serve the
        core (the message names the core and the estimators that can).
    """
    info = get_estimator_info(name)
    allowed = estimator_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"estimator {name!r} has no option(s) {unknown}; its options: {sorted(allowed)}.")
    reason = info.unsupported_reason(core)
    if reason is not None:
        able = [e.name for e in registered() if e.unsupported_reason(core) is None]
        core_name = getattr(core, "name", type(core).__name__)
        raise ValueError(
            f"estimator {name!r} cannot serve core {core_name!r}: {reason}. "
            f"Estimators that can: {', '.join(able)}."
        )
    return info.make(core, **options)


register("rtrl", rtrl, summary="exact RTRL: dense influence matrix, forward-mode autodiff")
register(
    "tbptt",
    lambda core, window=10, aligned=False: tbptt(core, window, aligned=aligned),
    summary="truncated BPTT over a sliding (or aligned) window of k steps",
)
register(
    "snap",
    snap,
    summary="SnAp-n: RTRL on the entries a parameter reaches in n steps (SnAp-1: O(P) trace)",
    unsupported_reason=snap_unsupported_reason,
)
register(
    "rflo",
    rflo,
    summary="RFLO / e-prop: SnAp-1-shaped trace with the dynamics replaced by a leak",
    unsupported_reason=snap_unsupported_reason,
)
register("uoro", uoro, summary="UORO: unbiased rank-one trace, one jvp + one vjp per step")
register(
    "kf",
    kf_rtrl,
    summary="KF-RTRL: one Kronecker factor pair per Dense kernel, random-sign merge",
    unsupported_reason=kronecker.unsupported_reason,
)
register(
    "ok",
    ok,
    summary="r-OK: r Kronecker terms per Dense kernel, optimal unbiased reduction",
    unsupported_reason=kronecker.unsupported_reason,
)
