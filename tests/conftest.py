"""Test configuration.

Float64 per test
----------------
The suite runs with ``jax_enable_x64`` OFF, as users run. A test that needs float64 asks for it in
one of two ways (both enter ``jax.enable_x64(True)``, a thread-local context, for the test's setup,
call and teardown; jit caches are keyed on the flag, so float32 and float64 compilations never mix):

- the marker ``@pytest.mark.x64`` on a test, a class or a module (``pytestmark = pytest.mark.x64``);
- the fixture ``x64`` as an argument (``def test_exact(x64): ...``).

Fixtures wider than a function (module/session scope) are set up outside that context: one that
builds float64 arrays enters ``with jax.enable_x64(True):`` itself.

A test that flips ``jax_enable_x64`` globally (``jax.config.update``, as a float64 experiment spec
does) has the global value restored after it, so the flag never leaks into the next test.

Estimators registered at import time by test modules
----------------------------------------------------
``tests/test_conformance.py`` parameterises over ``rtrl_jax.registered()`` when it is collected. So
that an estimator registered at import time by ANY test module is covered whatever the collection
order, :func:`pytest_collection` imports every ``tests/test_*.py`` module (the ones pytest is about to
collect) before collection starts; pytest then reuses those module objects.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import pytest
from _pytest.pathlib import import_path  # the function pytest's collector imports test modules with

TESTS = Path(__file__).resolve().parent

# pytester: tests/test_registry_extension.py checks the collection-order mechanism in a small session.
pytest_plugins = ["pytester"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "x64: run the test (setup, call, teardown) with jax_enable_x64 on (see tests/conftest.py)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Runs an ``x64``-marked test's setup, call and teardown inside ``jax.enable_x64(True)``."""
    if item.get_closest_marker("x64") is None:
        yield
        return
    with jax.enable_x64(True):
        yield


@pytest.fixture
def x64():
    """Float64 for the test that asks for it (its function-scoped fixtures after this one too)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _restore_global_x64():
    """Restores a global ``jax_enable_x64`` that the test changed (``jax.config.update``)."""
    before = jax.enable_x64.get_global()
    yield
    if jax.enable_x64.get_global() != before:
        jax.config.update("jax_enable_x64", before)


def _import_test_modules(session) -> None:
    """Imports the ``test_*.py`` modules under ``tests/`` that this pytest run collects, exactly as
    pytest's collector imports them (same function, same arguments, so pytest reuses the module
    objects), so that their import-time registrations precede the collection of any module."""
    config = session.config
    files = set()
    for arg in config.args:
        path = (config.invocation_params.dir / str(arg).split("::")[0]).resolve()
        if path.is_dir():
            files.update(path.rglob("test_*.py"))
        elif path.name.startswith("test_") and path.suffix == ".py":
            files.add(path)
    for path in sorted(files):
        if TESTS not in path.parents:
            continue
        # An error is left for pytest to report when it collects the module itself.
        with contextlib.suppress(Exception, pytest.skip.Exception):
            import_path(
                path,
                mode=config.getoption("--import-mode"),
                root=config.rootpath,
                consider_namespace_packages=config.getini("consider_namespace_packages"),
            )


def pytest_collection(session):
    _import_test_modules(session)
