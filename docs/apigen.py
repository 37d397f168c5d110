"""Pages of the documentation generated from the code when Sphinx starts (a Sphinx extension).

Everything here is read off the package, so a public name, an estimator or a config key added to
the code appears in the docs without editing them:

- the API reference: one page per source module of the names in ``rtrl_jax.__all__`` and
  ``rtrl_jax.experiment.__all__``, each name documented by autodoc from its docstring;
- one page per registered estimator (``rtrl_jax.registered()``): its summary, options, needs for a
  key, and its factory's module docstring (the maths) and docstring;
- the command line (each sub-command's ``--help``, from ``rtrl_jax.cli.build_parser``) and the
  config reference (every dotted key with its type, default and meaning, from the dataclasses of
  ``rtrl_jax.experiment.spec``).

The pages are written under ``docs/_generated/`` (not kept in git). A public function or class
without a docstring is reported as a warning, which ``sphinx-build -W`` turns into an error. Only
the Sphinx hooks at the end import Sphinx, so ``tests/test_docs.py`` checks the generated text
without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "_generated"
PACKAGES = ("rtrl_jax", "rtrl_jax.experiment")


def public_names(package: str) -> dict[str, Any]:
    """The objects of ``package.__all__`` by name."""
    module = importlib.import_module(package)
    return {name: getattr(module, name) for name in module.__all__}


def _assigning_modules(package: str, name: str, obj: Any) -> list[str]:
    """The modules of the package whose source assigns ``name`` (bound to ``obj``) at top level."""
    assignment = re.compile(rf"^{name}\s*(:[^=]*)?=", flags=re.M)
    found = []
    for module_name, module in sorted(sys.modules.items()):
        defines = module_name.startswith("rtrl_jax") and getattr(module, name, None) is obj
        if defines and assignment.search(inspect.getsource(module)):
            found.append(module_name)
    return found


def _home(obj: Any, package: str, name: str) -> str:
    """The source module an object of ``package`` is defined in."""
    if inspect.isclass(obj) or callable(obj):
        module = getattr(obj, "__module__", None) or ""
        return module if module.startswith("rtrl_jax") else package
    return next(iter(_assigning_modules(package, name, obj)), package)


def _page_title(module_name: str) -> str:
    """``rtrl_jax._src.snap`` -> ``snap``, ``rtrl_jax.experiment.build`` -> ``experiment.build``."""
    return module_name.removeprefix("rtrl_jax._src.").removeprefix("rtrl_jax.")


def _summary_line(module_name: str) -> str:
    doc = inspect.getdoc(importlib.import_module(module_name)) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def undocumented(package: str) -> list[str]:
    """The functions and classes of ``package.__all__`` without a docstring of their own."""
    missing = []
    for name, obj in public_names(package).items():
        if inspect.isfunction(obj):
            doc = obj.__doc__
        elif inspect.isclass(obj):
            doc = vars(obj).get("__doc__")
            # NamedTuple and dataclass write a docstring of their own: the signature.
            if doc and doc.startswith(f"{obj.__name__}("):
                doc = None
        else:
            continue
        if not doc or not doc.strip():
            missing.append(f"{package}.{name}")
    return missing


def value_comment(package: str, name: str) -> str:
    """The ``#:`` comment lines right above the assignment of the value ``package.name`` in the
    module that defines it ("" if it has none)."""
    obj = getattr(importlib.import_module(package), name)
    for module_name in _assigning_modules(package, name, obj):
        lines = inspect.getsource(sys.modules[module_name]).splitlines()
        index = next(i for i, line in enumerate(lines) if re.match(rf"^{name}\s*(:[^=]*)?=", line))
        comment = []
        while index > 0 and lines[index - 1].startswith("#:"):
            index -= 1
            comment.insert(0, lines[index][2:].strip())
        if comment:
            return "\n".join(comment)
    return ""


def _directive(package: str, name: str, obj: Any) -> list[str]:
    if inspect.isclass(obj):
        return [f".. autoclass:: {package}.{name}", "   :members:", "   :show-inheritance:", ""]
    if callable(obj):
        return [f".. autofunction:: {package}.{name}", ""]
    lines = [f".. py:data:: {package}.{name}", f"   :type: {type(obj).__name__}"]
    if isinstance(obj, (tuple, list, str, int, float)):
        lines.append(f"   :value: {obj!r}")
    text = value_comment(package, name)
    if isinstance(obj, dict):
        text += f"\n\nKeys: {', '.join(f'``{key}``' for key in obj)}."
    return [*lines, "", *(f"   {line}" if line else "" for line in text.strip().splitlines()), ""]


def api_pages(package: str) -> dict[str, str]:
    """``{file name: reST}``: one API page per source module of ``package.__all__``."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for name, obj in public_names(package).items():
        groups.setdefault(_home(obj, package, name), []).append((name, obj))
    pages = {}
    for module_name, members in sorted(groups.items()):
        title = _page_title(module_name)
        lines = [title, "=" * len(title), "", _summary_line(module_name), ""]
        lines += [f".. currentmodule:: {package}", ""]
        listed = [f"   {name}" for name, obj in members if inspect.isclass(obj) or callable(obj)]
        if listed:
            lines += [".. autosummary::", "   :nosignatures:", "", *listed, ""]
        for name, obj in members:
            lines += _directive(package, name, obj)
        pages[f"{package}/{title}.rst"] = "\n".join(lines)
    return pages


def _option_text(value: Any) -> str:
    from rtrl_jax._src.registry import REQUIRED

    return "required" if value is REQUIRED else f"``{value!r}``"


def estimator_page(info: Any) -> str:
    """The reST page of one registry entry."""
    make = info.make
    title = f"``{info.name}``: {info.summary}"
    lines = [title, "=" * len(title), ""]
    options = ", ".join(f"``{key}`` ({_option_text(value)})" for key, value in info.options.items())
    lines += [
        f"- options: {options or 'none'}",
        f"- needs a random key: {'yes' if info.needs_key else 'no'}",
        f"- options that build it on any core it serves: ``{dict(info.example_options)!r}``",
        f"- build it: ``rtrl_jax.make_estimator({info.name!r}, core, **options)``, or"
        f" ``rtrl-jax train estimator={info.name}``",
        "",
    ]
    module = inspect.getmodule(make)
    if module is not None and module.__name__.startswith("rtrl_jax") and module.__doc__:
        lines += [f".. automodule:: {module.__name__}", "   :no-index:", ""]
    import rtrl_jax

    public = getattr(rtrl_jax, make.__name__, None) is make
    qualified = f"rtrl_jax.{make.__name__}" if public else f"{make.__module__}.{make.__qualname__}"
    lines += [f".. autofunction:: {qualified}", "   :no-index:", ""]
    return "\n".join(lines)


def estimator_pages() -> dict[str, str]:
    """``{file name: reST}``: one page per registered estimator, and their index."""
    from rtrl_jax import registered

    infos = registered()
    pages = {f"{info.name}.rst": estimator_page(info) for info in infos}
    index = ["Estimators", "==========", ""]
    index += ["Every registered estimator, its options and the maths of its trace.", ""]
    index += [".. toctree::", "   :maxdepth: 1", ""] + [f"   {info.name}" for info in infos]
    pages["index.rst"] = "\n".join(index) + "\n"
    return pages


def cli_page() -> str:
    """The command line's help, sub-command by sub-command."""
    from rtrl_jax.cli import build_parser

    parser = build_parser()
    sections = [("rtrl-jax", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sections += [(f"rtrl-jax {name}", sub) for name, sub in action.choices.items()]
    lines = ["# Command line", "", "Generated from `rtrl_jax.cli.build_parser()`.", ""]
    for title, sub in sections:
        sub.prog = title
        lines += [f"## `{title}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def _attributes(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a dataclass's docstring, by field name."""
    doc = inspect.getdoc(cls) or ""
    block = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    found: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        match = re.match(r"^  (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            found[current] = match.group(2)
        elif current and line.startswith("    "):
            found[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return found


def _type_text(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _key_rows(cls: type, prefix: str) -> list[str]:
    rows = []
    hints = typing.get_type_hints(cls)
    meanings = _attributes(cls)
    defaults = cls()
    for field in dataclasses.fields(cls):
        value = getattr(defaults, field.name)
        if dataclasses.is_dataclass(value):
            continue
        meaning = meanings.get(field.name, "").replace("|", "\\|")
        default = repr(value).replace("|", "\\|")
        rows.append(f"| `{prefix}{field.name}` | {_type_text(hints[field.name])} | `{default}` | {meaning} |")
    return rows


def _config_table(cls: type) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += _key_rows(cls, "")
    for field in dataclasses.fields(cls):
        value = getattr(cls(), field.name)
        if dataclasses.is_dataclass(value):
            lines += _key_rows(type(value), f"{field.name}.")
    return lines


def config_page() -> str:
    """Every key of the run and comparison configs, from the spec's dataclasses."""
    import yaml

    from rtrl_jax.experiment import spec

    lines = [
        "# Config reference",
        "",
        "Generated from the dataclasses of `rtrl_jax.experiment.spec`. A config is a YAML file with these",
        "keys (any subset: the rest keep their defaults), or `key=value` overrides on the command line",
        "with the dotted keys below. Names and combinations are checked by `rtrl_jax.experiment.build`.",
        "",
        "## `rtrl-jax train`: a run",
        "",
        *_config_table(spec.RunConfig),
        "",
        "The embedded default config, in full:",
        "",
        "```yaml",
        yaml.safe_dump(spec.to_dict(spec.RunConfig()), sort_keys=False).rstrip(),
        "```",
        "",
        "## `rtrl-jax compare`: a gradient-quality comparison",
        "",
        *_config_table(spec.CompareConfig),
        "",
    ]
    return "\n".join(lines)


def plots_page() -> str:
    """Every PNG the benchmark commands wrote into ``benchmarks/results/`` (included by
    ``docs/benchmarks.md``, so the image paths are relative to ``docs/``)."""
    results = OUT.parent.parent / "benchmarks" / "results"
    lines = ["The PNG files written by the benchmark commands above into `benchmarks/results/`.", ""]
    for path in sorted(results.rglob("*.png")):
        name = path.relative_to(results).as_posix()
        lines += [f"### `{name}`", "", f"![{name}](../benchmarks/results/{name})", ""]
    return "\n".join(lines)


def all_pages() -> dict[str, str]:
    """``{path under _generated: text}`` of every generated page."""
    pages = {f"api/{name}": text for package in PACKAGES for name, text in api_pages(package).items()}
    pages.update({f"estimators/{name}": text for name, text in estimator_pages().items()})
    pages["cli.md"] = cli_page()
    pages["config.md"] = config_page()
    pages["plots.md"] = plots_page()
    return pages


def write_pages(out: Path = OUT) -> None:
    """Writes the generated pages, leaving files whose text is unchanged untouched (so Sphinx does
    not rebuild them) and removing stale ones."""
    pages = all_pages()
    for old in out.rglob("*") if out.exists() else ():
        if old.is_file() and old.relative_to(out).as_posix() not in pages:
            old.unlink()
    for name, text in pages.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def _on_builder_inited(app: Any) -> None:
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    write_pages()
    for package in PACKAGES:
        for name in undocumented(package):
            logger.warning(f"public name without a docstring: {name}")


def _exists(target: str) -> bool:
    """Whether ``target`` (dotted, or a bare name) names something in the package's code."""
    module_name, _, attr = target.rpartition(".")
    if target in sys.modules or (module_name in sys.modules and hasattr(sys.modules[module_name], attr)):
        return target.startswith("rtrl_jax")
    return any(name.startswith("rtrl_jax") and attr in vars(m) for name, m in list(sys.modules.items()))


def _on_missing_reference(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolves references to the package's Python objects that Sphinx cannot find as written.

    The API pages document each public name where users import it (``rtrl_jax.snap_mask``), while
    docstrings in the source modules name it as their module sees it (``snap_mask``,
    ``rtrl_jax._src.snap.snap_mask``): such a reference links to the public name. A reference to
    a module or a name that exists in the package but is not public (a type alias, a helper) is
    shown as code without a link. Anything else stays a missing reference (an error under ``-W``).
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    name = target.rpartition(".")[2]
    domain = env.get_domain("py")
    for package in PACKAGES:
        if name in importlib.import_module(package).__all__:
            public = f"{package}.{name}"
            found = domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], public, node, contnode
            )
            if found is not None:
                return found
    if node["reftype"] == "mod" and target.startswith("rtrl_jax"):
        docname = f"_generated/api/rtrl_jax/{name.lstrip('_')}"
        if docname in env.all_docs:
            uri = app.builder.get_relative_uri(node["refdoc"], docname)
            from docutils import nodes

            return nodes.reference("", "", contnode, internal=True, refuri=uri)
    return contnode if _exists(target) else None


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", _on_builder_inited)
    app.connect("missing-reference", _on_missing_reference)
    return {"parallel_read_safe": True}
