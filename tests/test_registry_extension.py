"""A new estimator is a factory and one ``register`` call: the CLI lists it, the config accepts it and
the conformance checks run it, without touching any other file."""

from pathlib import Path

import conformance
import jax
import jax.numpy as jnp
import pytest

import rtrl_jax
from rtrl_jax.cli import main
from rtrl_jax.experiment import build, load_config

TESTS = Path(__file__).resolve().parent


def zero(core):
    """A frozen estimator: no trace, a zero gradient."""
    return rtrl_jax.Estimator(
        init=lambda params, carry, *, key=None: (),
        step=lambda trace, params, carry, x, *, key=None: (*core(params, carry, x), ()),
        grad=lambda trace, params, carry_bar: jax.tree.map(jnp.zeros_like, params),
    )


@pytest.fixture
def zero_registered():
    info = rtrl_jax.register("zero", zero, summary="a frozen estimator: zero gradient")
    try:
        yield info
    finally:
        rtrl_jax.unregister("zero")


def test_listed_by_the_cli(zero_registered, capsys):
    assert main(["estimators"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("zero ") and "a frozen estimator: zero gradient" in line for line in lines)


def test_accepted_by_the_config(zero_registered):
    experiment = build(load_config(None, ["estimator=zero"]))
    assert experiment.spec.estimator == "zero"
    trace = experiment.estimator.init(*experiment.core.init(jax.random.PRNGKey(0)))
    assert trace == ()


def test_passes_the_conformance_checks(zero_registered):
    for cell in conformance.cells_served(zero_registered, conformance.DEFAULT_CELLS):
        for dtype in conformance.DEFAULT_DTYPES[cell]:
            conformance.check_all(conformance.compute(zero_registered, cell, dtype))


def test_unregistered_after_the_test():
    assert "zero" not in [info.name for info in rtrl_jax.registered()]


REGISTERING = """
import rtrl_jax

rtrl_jax.register("zero_at_import", lambda core: rtrl_jax.rtrl(core), summary="registered at import")
"""


@pytest.mark.parametrize("with_hook", [True, False])
def test_import_time_registration_is_covered_whatever_the_collection_order(pytester, with_hook):
    """A copy of test_conformance.py collected first (``test_a_*``) has cases for an estimator that a
    module collected after it (``test_z_*``) registers at import: conftest.py imports every test
    module before collection. Without that hook it would not (the control)."""
    conftest = (TESTS / "conftest.py").read_text()
    if not with_hook:
        conftest = conftest.replace("def pytest_collection(session):", "def _unhooked(session):")
    pytester.makeconftest(conftest)
    pytester.makepyfile(
        test_a_conformance=(TESTS / "test_conformance.py").read_text(), test_z_registers=REGISTERING
    )
    try:
        result = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    finally:
        if "zero_at_import" in [info.name for info in rtrl_jax.registered()]:
            rtrl_jax.unregister("zero_at_import")
    collected = result.stdout.str()
    assert "test_a_conformance.py::test_shapes_and_dtypes[rtrl-gru-float32]" in collected
    assert ("test_shapes_and_dtypes[zero_at_import-gru-float32]" in collected) == with_hook, collected
