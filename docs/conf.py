"""Sphinx configuration: ``sphinx-build -W --keep-going docs docs/_build/html`` builds the site.

The API reference, the estimator pages, the command line and the config reference are generated
from the code when the build starts (``docs/apigen.py``); the tutorials are executed MyST-NB
documents, run on the CPU at every build.
"""

import importlib.metadata
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))
# The tutorials and the API pages import JAX: keep the build on the CPU and quiet about it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "rtrl_jax"
author = "rtrl_jax contributors"
release = importlib.metadata.version("rtrl_jax")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "apigen",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", ".jupyter_cache", "_generated/plots.md"]

html_theme = "furo"
html_title = f"rtrl_jax {release}"

# autodoc: Google-style docstrings (napoleon), type hints in the signatures, members in source order.
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes as fields of their class (a NamedTuple's fields are also its members: one entry each).
napoleon_use_ivar = True

# Every cross-reference must resolve (warnings are errors in CI). Names of other packages cannot be
# linked without their inventories (the build runs offline), so those are let through.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|jnp|np|sp|numpy|optax|flax|nn|nnx|chex|scipy|orbax|yaml|tqdm|ocp)(\..*)?"),
    (r"py:.*", r"(typing|collections|collections\.abc|pathlib|argparse|dataclasses|types|enum)\..*"),
    (r"py:.*", r"(Any|Callable|Iterable|Iterator|Mapping|Sequence|NamedTuple|Optional|Union|Literal)"),
    (r"py:.*", r"ArrayTree"),  # chex's, in the fields of flax's TrainState
    (r"py:.*", r"(int|float|bool|str|bytes|dict|list|tuple|set|object|type|None|Path|Exception)"),
    (r"py:.*", r"(ValueError|RuntimeError|TypeError|KeyError|FileNotFoundError|UserWarning|Warning)"),
]

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Tutorials: executed at every build; a failing cell fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_show_tb = True
