"""The docs: the API reference is up to date and the tutorial's code runs."""

import re
import runpy
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_api_reference_is_up_to_date():
    # every documented name has its entry (docstring edits elsewhere do not fail this test; rerun
    # `python docs/make_api.py` to refresh the text)
    module = runpy.run_path(str(DOCS / "make_api.py"))
    expected = set(re.findall(r"^### `(\w+)`$", module["render"](), flags=re.M))
    written = set(re.findall(r"^### `(\w+)`$", (DOCS / "api.md").read_text(), flags=re.M))
    assert expected == written, (
        f"docs/api.md is out of date (missing {sorted(expected - written)},"
        f" stale {sorted(written - expected)}): run `python docs/make_api.py`"
    )


def test_tutorial_runs(capsys):
    blocks = python_blocks(DOCS / "tutorial_kf_rtrl.md")
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "tutorial"}
    for block in blocks:
        exec(compile(block, "tutorial_kf_rtrl.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "loss" in out and "finished" in out
    assert sys.modules  # the tutorial leaves the interpreter usable
