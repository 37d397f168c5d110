"""The documentation: what ``docs/apigen.py`` generates for the Sphinx site covers the code (every
public name, registered estimator, config key and command), and the tutorials are executed documents.

The site itself is built, its tutorials run and its cross-references checked by
``python -m sphinx -W --keep-going docs docs/_build/html`` (in ``.ci/run``); these tests check the
generated text without Sphinx, quickly.
"""

import argparse
import dataclasses
import re
import runpy
from pathlib import Path

import pytest

import rtrl_jax
from rtrl_jax import experiment
from rtrl_jax.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"
TUTORIALS = sorted(DOCS.glob("tutorial_*.md"))


@pytest.fixture(scope="module")
def apigen():
    return runpy.run_path(str(DOCS / "apigen.py"))


@pytest.fixture(scope="module")
def pages(apigen):
    return apigen["all_pages"]()


def _documented(pages: dict[str, str]) -> set[str]:
    text = "\n".join(text for name, text in pages.items() if name.startswith("api/"))
    return set(re.findall(r"^\.\. (?:autoclass|autofunction|py:data):: ([\w.]+)$", text, flags=re.M))


def test_every_public_name_has_an_api_entry(pages):
    expected = {f"rtrl_jax.{name}" for name in rtrl_jax.__all__}
    expected |= {f"rtrl_jax.experiment.{name}" for name in experiment.__all__}
    assert _documented(pages) == expected


def test_every_public_function_and_class_has_a_docstring(apigen):
    assert apigen["undocumented"]("rtrl_jax") == []
    assert apigen["undocumented"]("rtrl_jax.experiment") == []


def test_undocumented_names_are_found(apigen, monkeypatch):
    # the control: a public function without a docstring is reported
    def bare():
        pass

    monkeypatch.setattr(rtrl_jax, "bare", bare, raising=False)
    monkeypatch.setattr(rtrl_jax, "__all__", [*rtrl_jax.__all__, "bare"])
    assert apigen["undocumented"]("rtrl_jax") == ["rtrl_jax.bare"]


def test_an_estimator_registered_anywhere_gets_its_page(apigen):
    def scaled(core, scale=1.0):
        """Exact RTRL (a stand-in factory with one option)."""
        return rtrl_jax.rtrl(core)

    rtrl_jax.register("scaled_doc_test", scaled, summary="a stand-in estimator")
    try:
        pages = apigen["estimator_pages"]()
    finally:
        rtrl_jax.unregister("scaled_doc_test")
    assert {f"{info.name}.rst" for info in rtrl_jax.registered()} < set(pages)
    page = pages["scaled_doc_test.rst"]
    assert "a stand-in estimator" in page and "``scale`` (``1.0``)" in page
    assert "scaled_doc_test" in pages["index.rst"]


def _keys(cls, prefix=""):
    keys = []
    for field in dataclasses.fields(cls):
        value = getattr(cls(), field.name)
        if dataclasses.is_dataclass(value):
            keys += _keys(type(value), f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


@pytest.mark.parametrize("config", [experiment.RunConfig, experiment.CompareConfig])
def test_config_reference_has_every_key_with_its_meaning(pages, config):
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `([\w.]+)` \|[^|]*\|[^|]*\| (.*) \|$", pages["config.md"], flags=re.M)
    }
    for key in _keys(config):
        assert key in rows, key
        assert rows[key].strip(), f"{key} has no meaning in {config.__name__}'s Attributes"


def test_cli_reference_has_every_command(pages):
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert len(commands.choices) >= 4
    for command in commands.choices:
        assert f"## `rtrl-jax {command}`" in pages["cli.md"]
    assert "--resume RUN_DIR" in pages["cli.md"]


@pytest.mark.parametrize("path", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_tutorials_are_executed_documents_in_the_site(path):
    text = path.read_text()
    assert text.startswith("---\nfile_format: mystnb\nkernelspec:\n  name: python3\n")
    assert "```python" not in text  # code that would not run: every block is a code cell
    assert text.count("```{code-cell} ipython3") >= 3
    assert path.stem in (DOCS / "index.md").read_text()


def test_four_tutorials():
    assert {path.stem for path in TUTORIALS} >= {
        "tutorial_kf_rtrl",
        "tutorial_compare",
        "tutorial_whole_model",
        "tutorial_own_estimator",
    }
