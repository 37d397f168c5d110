"""Gradient-quality tooling: exact RTRL aligns with itself, windows raise UORO/KF/OK alignment, outputs."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from rtrl_jax import from_linen, kf_rtrl, ok, rtrl, uoro
from rtrl_jax._src.compare import compare_gradients, gradient_alignment, gradient_bias_variance, window_sums
from rtrl_jax.cli import main
from rtrl_jax.experiment import ConfigError, load_compare_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _setup(hidden=6, steps=120, learnable=False):
    core = from_linen(nn.SimpleCell(features=hidden), 2)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, 2), jnp.float64)
    ys = jax.random.normal(jax.random.PRNGKey(2), (steps, hidden), jnp.float64)
    if learnable:
        ys = jnp.full((steps, hidden), 0.5, jnp.float64)

    def loss_fn(out, y):
        return 0.5 * jnp.sum((out - y) ** 2)

    return core, params, carry, xs, ys, loss_fn


def test_exact_rtrl_aligns_with_itself_and_uoro_rises_with_the_window(x64):
    core, params, carry, xs, ys, loss_fn = _setup()
    result = compare_gradients(
        core,
        {"rtrl": rtrl(core), "uoro": uoro(core), "kf": kf_rtrl(core), "ok": ok(core, rank=1)},
        rtrl(core),
        params,
        carry,
        xs,
        ys,
        loss_fn,
        keys=jax.random.split(jax.random.PRNGKey(3), 6),
        windows=(1, 10, 40),
    )
    exact = result.summary["rtrl"]
    for w in (1, 10, 40):
        assert exact[f"cosine@{w}"] == pytest.approx(1.0, abs=1e-12)
        assert exact[f"rel_error@{w}"] == pytest.approx(0.0, abs=1e-12)
    assert exact["variance"] == pytest.approx(0.0, abs=1e-20)
    u = result.summary["uoro"]
    assert u["cosine@1"] < u["cosine@10"] < u["cosine@40"]
    for name in ("kf", "ok"):  # unbiased noise cancels in window sums
        assert result.summary[name]["cosine@1"] < result.summary[name]["cosine@40"]
    assert u["variance"] > 0
    assert result.curves["uoro"][10].shape == (12,)
    assert result.loss.shape == (6, 120)


def test_training_by_an_estimator_moves_the_parameters(x64):
    core, params, carry, xs, ys, loss_fn = _setup(steps=60, learnable=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    frozen = compare_gradients(core, {"u": uoro(core)}, rtrl(core), params, carry, xs, ys, loss_fn, keys=keys)
    trained = compare_gradients(
        core,
        {"u": uoro(core)},
        rtrl(core),
        params,
        carry,
        xs,
        ys,
        loss_fn,
        keys=keys,
        train_with="exact",
        learning_rate=0.05,
    )
    assert trained.loss[:, -20:].mean() < frozen.loss[:, -20:].mean()
    with pytest.raises(ValueError, match="train_with"):
        compare_gradients(
            core, {"u": uoro(core)}, rtrl(core), params, carry, xs, ys, loss_fn, keys=keys, train_with="nope"
        )


def test_window_sums_alignment_and_bias_variance_by_hand():
    g = jnp.arange(12.0).reshape(6, 2)
    assert jnp.allclose(window_sums(g, 3), jnp.array([[6.0, 9.0], [24.0, 27.0]]))
    a = gradient_alignment(-g, g, 2)
    assert a["cosine"] == pytest.approx(-1.0) and a["rel_error"] == pytest.approx(2.0)
    exact = jnp.ones((4, 3))
    samples = jnp.stack([exact + 1.0, exact - 1.0])  # unbiased, variance 3 per step vs ‖g‖² = 3
    stats = gradient_bias_variance(samples, exact)
    assert stats["variance"] == pytest.approx(1.0)
    assert stats["bias2"] == pytest.approx(-1.0)  # 0 − tr Σ̂/K = −(2·3)/2 / 3
    with pytest.raises(ValueError, match="2 keys"):
        gradient_bias_variance(samples[:1], exact)


def test_compare_command_writes_json_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--out",
            str(out),
            "steps=60",
            "num_keys=2",
            "windows=[1, 5]",
            "model.hidden=4",
            "estimators={rtrl: {}, uoro: {}, tb3: {estimator: tbptt, window: 3}}",
        ]
    )
    assert code == 0
    doc = json.loads((out / "compare.json").read_text())
    assert list(doc["summary"]) == ["rtrl", "uoro", "tb3"]
    assert doc["summary"]["rtrl"]["cosine@5"] == pytest.approx(1.0, abs=1e-5)
    assert "| uoro |" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "compare.json" in capsys.readouterr().out


def test_shipped_compare_configs_are_valid():
    paths = sorted(CONFIGS.glob("compare_*.yaml"))
    assert paths
    for path in paths:
        load_compare_config(path)


def test_compare_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train_with"):
        load_compare_config(None, ["train_with=nope"])
    with pytest.raises(ConfigError, match="windows"):
        load_compare_config(None, ["windows=[0]"])
    assert main(["compare", "estimators={ok: {rank: 0}}"]) == 2
