"""The options of estimators and tasks come from the registry and the task table: the listing,
docs/options.md (never stale) and ``rtrl-jax config`` (defaults filled in, overrides applied)."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

import rtrl_jax as rj
from rtrl_jax.cli import build_parser, main
from rtrl_jax.experiment import ConfigError, load_config
from rtrl_jax.experiment.build import task_options
from rtrl_jax.experiment.options import cell_support, config_with_defaults, options_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def listing():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["estimators"]) == 0
    return out.getvalue()


def test_options_page_is_up_to_date():
    assert (DOCS / "options.md").read_text() == options_markdown(), "run `python docs/make_options.py`"


def test_listing_shows_every_estimator_with_its_options_and_required_ones(listing):
    for info in rj.registered():
        assert f"\n{info.name:10s} {info.summary}\n" in f"\n{listing}"
    rflo = listing.split("\nrflo ")[1].split("\nrtrl ")[0]
    assert "options: leak=None, num_probes=3, seed=0" in rflo
    assert "cells: leaky, lif, alif" in rflo and "needs: leak= for simple, gru, lstm" in rflo
    support = cell_support("rflo")
    assert support.needs["gru"] == ("leak",) and "gru" not in support.cells
    with pytest.raises(ValueError, match="leak"):  # the need is real: without leak= it does not build
        rj.make_estimator("rflo", rj.from_linen(rj.experiment.CELLS["gru"](4), 2))
    assert cell_support("tbptt").needs == {}


def test_config_prints_the_defaults_with_the_overrides_applied(tmp_path, capsys):
    assert main(["config", "estimator=tbptt", "task=add", "model.hidden=7"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["estimator_options"] == rj.estimator_options("tbptt")
    assert data["task_options"] == task_options("add") and data["model"]["hidden"] == 7
    assert data["train"]["steps"] == load_config().train.steps
    (tmp_path / "c.yaml").write_text(printed)  # it loads back as the same run
    reloaded = load_config(tmp_path / "c.yaml")
    assert config_with_defaults(reloaded) == data and reloaded.model.hidden == 7
    explicit = config_with_defaults(load_config(None, ["estimator=tbptt", "estimator_options.window=3"]))
    assert explicit["estimator_options"]["window"] == 3
    with pytest.raises(ConfigError, match="unknown estimator 'nope'"):
        config_with_defaults(load_config(None, ["estimator=nope"]))


def test_train_help_points_at_the_config_keys():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert "rtrl-jax config" in train.format_help() and "docs/options.md" in train.format_help()
