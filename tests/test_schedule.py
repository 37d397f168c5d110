"""Learning-rate schedules of the experiment layer: the rate of each update, and the spec key."""

import jax.numpy as jnp
import numpy as np
import pytest

from rtrl_jax.experiment import ConfigError, build, build_optimizer, load_config


def _rates(optimizer, updates: int) -> list[float]:
    """The step sizes of ``updates`` SGD updates on a unit gradient (the update is ``-rate``)."""
    params = {"w": jnp.zeros(())}
    state = optimizer.init(params)
    rates = []
    for _ in range(updates):
        update, state = optimizer.update({"w": jnp.ones(())}, state, params)
        rates.append(-float(update["w"]))
    return rates


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.2] * 6),
        ("linear", [0.2 * (1 - k / 4) for k in range(4)] + [0.0, 0.0]),
        ("cosine", [0.1 * (1 + np.cos(np.pi * k / 4)) for k in range(4)] + [0.0, 0.0]),
    ],
)
def test_schedules_give_the_rate_of_each_update_and_reach_zero(schedule, expected):
    rates = _rates(build_optimizer("sgd", 0.2, schedule=schedule, decay_steps=4), 6)
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-8)


def test_schedule_counts_applied_updates_under_update_every():
    rates = _rates(build_optimizer("sgd", 0.2, schedule="linear", decay_steps=2, update_every=2), 6)
    # the gradients of two steps are averaged, then applied at the rate of update 0, 1, 2 (= 0)
    np.testing.assert_allclose(rates, [0.0, 0.2, 0.0, 0.1, 0.0, 0.0], rtol=1e-6, atol=1e-8)


def test_run_spec_decays_over_its_steps():
    experiment = build(
        load_config(None, ["model.hidden=2", "train.steps=8", "train.optimizer=sgd", "train.schedule=linear"])
    )
    rates = _rates(experiment.optimizer, 9)
    np.testing.assert_allclose(rates[0], 3e-3, rtol=1e-6)
    assert rates[-2] > 0 and rates[-1] == 0.0


def test_unknown_schedule_and_missing_decay_steps_are_rejected_with_the_key():
    with pytest.raises(ConfigError, match="train.schedule.*'step'"):
        build(load_config(None, ["train.schedule=step"]))
    with pytest.raises(ConfigError, match="schedule: cosine needs decay_steps >= 1"):
        build_optimizer("adam", 0.1, schedule="cosine", key="optimizer")
