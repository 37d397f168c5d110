"""Writes docs/api.md, the API reference, from the docstrings of the public names.

Run ``python docs/make_api.py`` after changing a public docstring or signature;
``tests/test_docs.py`` fails while docs/api.md is out of date.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "api.md"

# (title, module, names or None for the module's __all__)
SECTIONS = [
    ("rtrl_jax", "rtrl_jax", None),
    ("The experiment layer (rtrl_jax.experiment)", "rtrl_jax.experiment", None),
    (
        "Online training internals (rtrl_jax._src.trainer)",
        "rtrl_jax._src.trainer",
        ["NonFiniteError", "nonfinite_names", "make_train_chunk"],
    ),
    (
        "Text data (rtrl_jax._src.text)",
        "rtrl_jax._src.text",
        ["load_text", "TextDataError", "char_task", "char_stream", "vocabulary", "Vocabulary"],
    ),
]


def _signature(obj) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def _entry(module_name: str, name: str, obj) -> list[str]:
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
    lines = [f"### `{name}`", ""]
    if kind != "value":
        lines += ["```python", f"{kind} {name}{_signature(obj)}", "```", ""]
    doc = inspect.getdoc(obj) if kind != "value" else None
    lines += [doc or "*(no docstring)*", ""]
    if inspect.isclass(obj):
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") or not inspect.isfunction(member) or not member.__doc__:
                continue
            lines += [f"#### `{name}.{attr}{_signature(member)}`", "", inspect.getdoc(member), ""]
    return lines


def render() -> str:
    """The text of docs/api.md."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/make_api.py`; do not edit by hand.",
        "",
    ]
    for title, module_name, names in SECTIONS:
        module = importlib.import_module(module_name)
        if title:
            lines += [f"## {title}", ""]
        for name in names if names is not None else module.__all__:
            lines += _entry(module_name, name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
