"""Writes docs/options.md, the options of every estimator and task and the config keys, from the
estimator registry and the task table (:func:`rtrl_jax.experiment.options.options_markdown`).

Run ``python docs/make_options.py`` after registering an estimator or changing an option;
``tests/test_options.py`` fails while docs/options.md is out of date.
"""

from __future__ import annotations

from pathlib import Path

from rtrl_jax.experiment.options import options_markdown

OUT = Path(__file__).resolve().parent / "options.md"

if __name__ == "__main__":
    OUT.write_text(options_markdown())
    print(f"wrote {OUT}")
