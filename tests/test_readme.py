"""The README's examples run as written; its estimator tables cover the registry."""

import re
import shlex
from pathlib import Path

import rtrl_jax as rj
from rtrl_jax.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["metrics"].loss.shape == (2000,)
    assert set(namespace["grads"]) == set(namespace["params"])


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    return text[start : text.index("\n#", start + len(title))]


def test_which_estimator_table_has_a_row_per_registered_estimator():
    rows = re.findall(r"^\| `(\w+)` \|", _section("### Which estimator?"), flags=re.M)
    assert sorted(rows) == sorted(info.name for info in rj.registered())


def test_command_line_examples_parse_and_the_listings_run(capsys):
    """Each command of the README's command-line block parses (optional parts dropped, placeholders
    filled in); the two listings run."""
    block = re.search(r"## Command line\n\n```\n(.*?)```", README.read_text(), flags=re.S).group(1)
    parser = build_parser()
    names = set()
    for line in block.splitlines():
        command = re.sub(r"\[[^]]*\]", "", line.split("#")[0])
        words = shlex.split(command.replace("RUN_DIR", "runs/x").replace("CONFIG", "c.yaml"))
        assert words[0] == "rtrl-jax"
        names.add(parser.parse_args(words[1:]).command)
    assert names == {"train", "plot", "compare", "estimators", "config"}
    assert main(["config", "task=add"]) == 0 and "task_options:\n  t1: 5" in capsys.readouterr().out
