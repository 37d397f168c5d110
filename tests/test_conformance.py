"""Every registered estimator × every shipped cell it serves × float32 and float64, held to the
checks of ``tests/conformance.py`` (shapes and dtypes, jit without retracing, vmap, the drop-in,
keys, restart at an episode start, exactness against BPTT where the registry says exact and not
elsewhere).

The cases are read off ``rtrl_jax.registered()`` when this module is collected; ``conftest.py``
imports every test module first, so an estimator that a test module registers at import time is
covered whatever the collection order. The default run covers every estimator on the
``conformance.DEFAULT_CELLS`` it serves in their ``DEFAULT_DTYPES`` (a dense Flax cell in float32,
an element-wise library cell with a pytree carry in float64); the rest of the product is marked
``slow`` (``pytest -m slow``). Each case is computed once (two compiled programs) and shared by its
tests.
"""

import conformance
import pytest

import rtrl_jax


def _cases():
    """Default cases: each estimator on the default cells it serves, in their default dtypes (or,
    serving none of them, on the first shipped cell it serves, in both dtypes). ``slow`` cases: the
    rest of the product; whether the estimator serves a cell is asked when such a case runs
    (asking costs a trace of the cell), and a case of a cell it does not serve is skipped with the
    estimator's reason."""
    cases = []
    for info in rtrl_jax.registered():
        default = {
            cell: conformance.DEFAULT_DTYPES[cell]
            for cell in conformance.cells_served(info, conformance.DEFAULT_CELLS)
        }
        if not default:
            default = {cell: conformance.DTYPES for cell in conformance.cells_served(info)[:1]}
        for cell in conformance.CELLS:
            for dtype in conformance.DTYPES:
                marks = () if dtype in default.get(cell, ()) else (pytest.mark.slow,)
                case_id = f"{info.name}-{cell}-{dtype}"
                cases.append(pytest.param(info.name, cell, dtype, id=case_id, marks=marks))
    return cases


COLLECTED: list[str] = []  # the estimators the cases were made for, when they were made


def pytest_generate_tests(metafunc):
    """Parameterises the tests with the cases when this module is collected (after ``conftest.py``
    has imported every test module, so after their import-time registrations): tests taking
    ``name, cell, dtype`` run every case, tests taking ``name, cell`` the float64 cases."""
    if not {"name", "cell"} <= set(metafunc.fixturenames):
        return
    cases = _cases()
    COLLECTED[:] = sorted({case.values[0] for case in cases})
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("name, cell, dtype", cases)
    else:
        float64 = [pytest.param(*case.values[:2], id=case.id, marks=case.marks) for case in cases]
        metafunc.parametrize("name, cell", [case for case in float64 if case.id.endswith("float64")])


@pytest.fixture(scope="session")
def results():
    """``results(name, cell, dtype)``: the case computed once per session (an error, too)."""
    cache = {}

    def get(name, cell, dtype):
        key = (name, cell, dtype)
        reason = rtrl_jax.get_estimator_info(name).unsupported_reason(conformance.core_of(cell))
        if reason is not None:
            pytest.skip(f"{name} does not serve {cell}: {reason}")
        if key not in cache:
            try:
                cache[key] = conformance.compute(rtrl_jax.get_estimator_info(name), cell, dtype)
            except Exception as error:  # noqa: BLE001 - every test of the case reports it
                cache[key] = error
        if isinstance(cache[key], Exception):
            raise cache[key]
        return cache[key]

    return get


def test_every_registered_estimator_is_covered():
    registered = sorted(info.name for info in rtrl_jax.registered())
    assert registered == COLLECTED, "an estimator registered after collection has no conformance cases"
    default = {case.values[0] for case in _cases() if not case.marks}
    assert default == set(registered), "every estimator has cases in the default run"


def test_shapes_and_dtypes(results, name, cell, dtype):
    conformance.check_shapes_and_dtypes(results(name, cell, dtype))


def test_jit_does_not_recompile(results, name, cell, dtype):
    conformance.check_jit_does_not_recompile(results(name, cell, dtype))


def test_vmap_equals_per_stream_loop(results, name, cell, dtype):
    conformance.check_vmap_equals_loop(results(name, cell, dtype))


def test_drop_in_equals_online_grad(results, name, cell, dtype):
    conformance.check_drop_in(results(name, cell, dtype))


def test_key_required_exactly_when_registered(results, name, cell, dtype):
    conformance.check_key(results(name, cell, dtype))


def test_restart_is_init_but_for_learned_parts(results, name, cell, dtype):
    conformance.check_restart(results(name, cell, dtype))


def test_exact_where_registered_and_not_elsewhere(results, name, cell):
    conformance.check_exactness(results(name, cell, "float64"))
