"""The estimator registry: every estimator by name, with what generic code needs to know about it.

Each estimator module registers itself with :func:`register` next to its factory, so adding an
estimator is its file, one ``register`` call and its own tests. An entry
(:class:`EstimatorInfo`) carries everything that code above the estimators would otherwise switch on
a name for:

- ``unsupported_reason(core)``: which cores it can serve (the CLI's listing, config validation and
  the error of :func:`make_estimator` all read it);
- ``needs_key``: whether ``init``/``step`` need ``key=``;
- ``options``: its keyword options with their defaults, read off the factory's signature, so each
  default lives in one place (the factory);
- ``exact_for(core, **options)``: whether its per-step gradient ``c_t · J_t`` is exact RTRL for that
  core and those options (the conformance suite holds every entry to it, both ways);
- ``example_options``: options that build it on every core it serves (e.g. RFLO's ``leak`` for
  cells without one), for listings and the conformance suite.

How a trace shards across devices is told by its state type (``param_axes``, see
:func:`rtrl_jax._src.base.trace_param_axes`), so sharding needs no entry here.

This module imports no estimator: the estimator modules import it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.trace_dtype import with_trace_dtype

REQUIRED = inspect.Parameter.empty
"""The default of an option that has none (:func:`estimator_options`)."""


class EstimatorInfo(NamedTuple):
    """A registered estimator.

    Attributes:
      name: the registry name (``"rtrl"``, ``"tbptt"``, ...).
      make: ``make(core, **options) -> Estimator``.
      summary: one line for listings.
      unsupported_reason: ``core -> str | None``: why the estimator cannot serve ``core``, or
        ``None`` when it can.
      needs_key: whether ``init`` and ``step`` need a random ``key=`` (stochastic estimators); a
        deterministic one accepts and ignores a key.
      options: ``{option: default}`` of ``make``'s keyword options (:data:`REQUIRED` for an option
        without a default).
      exact_for: ``(core, **options) -> bool``: whether the per-step gradient equals exact RTRL's
        (BPTT's) for that core and options; options left out take their defaults.
      example_options: options that build the estimator on every core it serves.
    """

    name: str
    make: Callable[..., Estimator]
    summary: str
    unsupported_reason: Callable[[Any], str | None]
    needs_key: bool
    options: Mapping[str, Any]
    exact_for: Callable[..., bool]
    example_options: Mapping[str, Any]


_REGISTRY: dict[str, EstimatorInfo] = {}


def serves_any(core: Any) -> str | None:
    """The ``unsupported_reason`` of an estimator that serves every core."""
    del core
    return None


def never_exact(core: Any, **options: Any) -> bool:
    """The ``exact_for`` of an estimator that is never exact RTRL."""
    del core, options
    return False


def always_exact(core: Any, **options: Any) -> bool:
    """The ``exact_for`` of an estimator that is exact RTRL for every core it serves."""
    del core, options
    return True


def _signature_options(make: Callable[..., Estimator]) -> dict[str, Any]:
    parameters = list(inspect.signature(make).parameters.values())[1:]  # the first is the core
    return {p.name: p.default for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def register(
    name: str,
    make: Callable[..., Estimator],
    *,
    summary: str,
    needs_key: bool = False,
    unsupported_reason: Callable[[Any], str | None] = serves_any,
    exact_for: Callable[..., bool] = never_exact,
    example_options: Mapping[str, Any] | None = None,
) -> EstimatorInfo:
    """Adds the estimator factory ``make(core, **options)`` to the registry under ``name``.

    Its options and their defaults are read off ``make``'s signature (every parameter after the
    core). See :class:`EstimatorInfo` for the other fields.

    Example::

        def zero(core):
            return Estimator(init=lambda params, carry, *, key=None: (),
                             step=lambda trace, params, carry, x, *, key=None: (*core(params, carry, x), ()),
                             grad=lambda trace, params, carry_bar: jax.tree.map(jnp.zeros_like, params))

        register("zero", zero, summary="no gradient at all")

    Returns:
      The new entry.

    Raises:
      ValueError: ``name`` is taken, or ``example_options`` names an option ``make`` does not take.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an estimator name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY:
        raise ValueError(f"an estimator named {name!r} is already registered.")
    options = _signature_options(make)
    example_options = dict(example_options or {})
    unknown = sorted(set(example_options) - set(options))
    if unknown:
        raise ValueError(f"example_options {unknown} of {name!r} are not options of its factory.")
    info = EstimatorInfo(
        name=name,
        make=make,
        summary=summary,
        unsupported_reason=unsupported_reason,
        needs_key=bool(needs_key),
        options=MappingProxyType(options),
        exact_for=exact_for,
        example_options=MappingProxyType(example_options),
    )
    _REGISTRY[name] = info
    return info


def unregister(name: str) -> None:
    """Removes ``name`` from the registry (for estimators registered for a while, e.g. in tests)."""
    get_estimator_info(name)
    del _REGISTRY[name]


def registered() -> list[EstimatorInfo]:
    """Every registered estimator, in registration order."""
    return list(_REGISTRY.values())


def get_estimator_info(name: str) -> EstimatorInfo:
    """The registry entry for ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; known estimators: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def estimator_options(name: str) -> dict[str, Any]:
    """The keyword options of the estimator ``name`` with their defaults (:data:`REQUIRED` for
    required ones)."""
    return dict(get_estimator_info(name).options)


def estimators_for(core: Any) -> list[str]:
    """The names of the registered estimators that can serve ``core``."""
    return [info.name for info in registered() if info.unsupported_reason(core) is None]


def unsupported_message(name: str, core: Any, reason: str) -> str:
    """The error for estimator ``name`` refusing ``core`` for ``reason``: names the core, the reason
    and the estimators that can serve it."""
    core_name = getattr(core, "name", type(core).__name__)
    return (
        f"estimator {name!r} cannot serve core {core_name!r}: {reason}. "
        f"Estimators that can: {', '.join(estimators_for(core))}."
    )


def _check_is_core(name: str, core: Any) -> None:
    """A Flax module is a cell, not a core: say how to make one."""
    if any(base.__module__.startswith("flax.") and base.__name__ == "Module" for base in type(core).__mro__):
        raise TypeError(
            f"estimator {name!r} needs a core, got the Flax module {type(core).__name__}: build one with"
            " rtrl_jax.from_linen(cell, input_size) for a linen cell or rtrl_jax.from_nnx(cell) for"
            " an nnx cell."
        )
    if not callable(core):
        raise TypeError(
            f"estimator {name!r} needs a core (a step function (params, carry, x) -> (carry, out)),"
            f" got {type(core).__name__}."
        )


def make_estimator(name: str, core: Any, *, trace_dtype: Any = None, **options: Any) -> Estimator:
    """Builds the estimator ``name`` for ``core``.

    ``trace_dtype`` (every estimator): store the trace's floating leaves in this narrower dtype
    between steps, e.g. ``"bfloat16"`` (:func:`rtrl_jax.with_trace_dtype`); ``None`` keeps them
    as the estimator computes them.

    Raises:
      ValueError: for an unknown name, an unknown option, or an estimator that cannot serve the
        core (the message names the core and the estimators that can).
      TypeError: ``core`` is not a core (e.g. a Flax cell not yet wrapped by ``from_linen``).
    """
    info = get_estimator_info(name)
    _check_is_core(name, core)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise ValueError(
            f"estimator {name!r} has no option(s) {unknown}; its options: {sorted(info.options)}."
        )
    reason = info.unsupported_reason(core)
    if reason is not None:
        raise ValueError(unsupported_message(name, core, reason))
    estimator = info.make(core, **options)
    if trace_dtype is not None:
        estimator = with_trace_dtype(estimator, trace_dtype)
    return estimator._replace(grad=_checked_grad(name, core, estimator.grad))


def _checked_grad(name: str, core: Any, grad: Callable[..., Any]) -> Callable[..., Any]:
    """``grad`` that first checks the cotangent has one entry per carry entry of ``core`` (a core
    without a ``carry_spec`` is not checked). The check reads shapes only, at trace time."""
    spec = getattr(core, "carry_spec", None)
    if spec is None:
        return grad
    size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(spec))

    def checked(trace, params, carry_bar):
        shapes = [tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(carry_bar)]
        if sum(math.prod(shape) for shape in shapes) != size:
            expected = [tuple(leaf.shape) for leaf in jax.tree.leaves(spec)]
            raise ValueError(
                f"estimator {name!r}: the cotangent carry_bar has shape(s) {shapes}, but the core's carry"
                f" has {expected} ({size} entries, one stream: map a batch with jax.vmap); pass"
                " dL/dh_t for the carry (rtrl_jax.carry_cotangent pulls back one on the output)."
            )
        return grad(trace, params, carry_bar)

    return checked


def is_exact(name: str, core: Any, **options: Any) -> bool:
    """Whether estimator ``name`` with ``options`` computes exact RTRL gradients for ``core``."""
    return bool(get_estimator_info(name).exact_for(core, **options))
