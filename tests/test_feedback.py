"""Random and adaptive feedback heads (random and adaptive e-prop, Bellec et al. 2020).

- with ``B`` equal to the readout kernel, a feedback head trains exactly as the linear head
  (symmetric feedback), for e-prop and for another estimator;
- random ``B`` gives another learning signal and stays fixed under Adam;
- adaptive ``B`` gets the readout kernel's gradient: under SGD with weight decay ``λ``,
  ``B ← B − η (∂L/∂W + λ B)`` and ``B − W`` shrinks by ``1 − ηλ`` per step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rtrl_jax
from rtrl_jax._src.feedback import feedback_head
from rtrl_jax.cli import main
from rtrl_jax.experiment import ConfigError, build, load_config, restore_final_state

pytestmark = pytest.mark.x64

INPUT, CLASSES, BATCH, STEPS = 3, 2, 2, 6
TOL = 1e-12


@pytest.fixture(scope="module")
def problem():
    with jax.enable_x64(True):
        cell = rtrl_jax.ALIFCell(4, beta=0.5, tau_adaptation=30.0, self_connections=False)
        core = rtrl_jax.from_linen(cell, INPUT)
        core_params, _ = core.init(jax.random.PRNGKey(0), jnp.float64)
        keys = jax.random.split(jax.random.PRNGKey(1), 2)
        inputs = 1.5 * jax.random.normal(keys[0], (BATCH, STEPS, INPUT), jnp.float64)
        labels = jax.random.randint(keys[1], (BATCH, STEPS), 0, CLASSES)
        stream = rtrl_jax.Stream(
            inputs=inputs,
            targets=jax.nn.one_hot(labels, CLASSES, dtype=jnp.float64),
            mask=jnp.ones((BATCH, STEPS), jnp.float64),
            reset=jnp.zeros((BATCH, STEPS), bool).at[:, 0].set(True),
        )
        head_params = feedback_head("random").init(jax.random.PRNGKey(2), 4, CLASSES, jnp.float64)
    return core, core_params, head_params, stream


HEADS = {
    "linear": rtrl_jax.linear_head(),
    "random": feedback_head("random"),
    "adaptive": feedback_head("adaptive"),
}
SGD, ADAM = optax.sgd(0.5), optax.adam(0.1)
LR, DECAY = 0.5, 0.1
SGD_DECAY = optax.chain(optax.add_decayed_weights(DECAY), optax.sgd(LR))
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}  # these programs run once: compile fast
RUNS = {}


def _train(problem, estimator_name, head, head_params, optimizer, num_steps=STEPS):
    """The parameters after each of the first ``num_steps`` trainer steps (all ``STEPS`` steps run
    in one jitted scan, compiled once per estimator, head and optimizer)."""
    core, core_params, _, stream = problem
    key = (estimator_name, head, id(optimizer))
    if key not in RUNS:
        estimator = rtrl_jax.make_estimator(estimator_name, core)
        step = rtrl_jax.make_train_step(core, estimator, optimizer, head=HEADS[head])

        def run(state, batches):
            def body(state, batch):
                state, _ = step(state, batch)
                return state, state.params

            return jax.lax.scan(body, state, batches)[1]

        RUNS[key] = estimator, jax.jit(run, compiler_options=COMPILER_OPTIONS)
    estimator, run = RUNS[key]
    state = rtrl_jax.init_train_state(
        core, estimator, optimizer, core_params, head_params, batch_size=BATCH, key=jax.random.PRNGKey(3)
    )
    history = run(state, jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), stream))
    return [jax.tree.map(lambda a, t=t: a[t], history) for t in range(num_steps)]


def _assert_close(got, want, tol=TOL):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(float(np.max(np.abs(b))), 1.0))


def _core_change(history, start):
    return jax.tree.map(lambda a, b: a - b, history[-1]["core"], start)


@pytest.mark.parametrize("estimator_name", ["eprop", pytest.param("rtrl", marks=pytest.mark.slow)])
def test_feedback_equal_to_the_readout_is_symmetric_feedback(problem, estimator_name):
    """B = W: one step of a random head, and every step of an adaptive head (B stays W), equal the
    linear head's."""
    _, core_params, head_params, _ = problem
    symmetric = dict(head_params, feedback=head_params["kernel"])
    linear = {"kernel": head_params["kernel"], "bias": head_params["bias"]}
    want = _train(problem, estimator_name, "linear", linear, SGD)
    random = _train(problem, estimator_name, "random", symmetric, SGD, num_steps=1)
    _assert_close({k: random[0][k] for k in ("core",)}, {"core": want[0]["core"]})
    adaptive = _train(problem, estimator_name, "adaptive", symmetric, SGD)
    for got, expected in zip(adaptive, want, strict=True):
        _assert_close(got["core"], expected["core"])
        _assert_close({k: got["head"][k] for k in linear}, expected["head"])
        np.testing.assert_array_equal(got["head"]["feedback"], got["head"]["kernel"])
    assert (
        max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(_core_change(want, core_params))) > 1e-3
    )


def test_random_feedback_differs_and_stays_fixed(problem):
    _, core_params, head_params, _ = problem
    linear = {"kernel": head_params["kernel"], "bias": head_params["bias"]}
    symmetric = _core_change(_train(problem, "eprop", "linear", linear, SGD), core_params)
    random = _core_change(_train(problem, "eprop", "random", head_params, SGD), core_params)
    for a, b in zip(jax.tree.leaves(random), jax.tree.leaves(symmetric), strict=True):
        assert np.linalg.norm(a - b) > 0.1 * np.linalg.norm(b)
    adam = _train(problem, "eprop", "random", head_params, ADAM)
    assert not np.allclose(adam[-1]["head"]["kernel"], head_params["kernel"])
    for params in adam:
        np.testing.assert_array_equal(params["head"]["feedback"], head_params["feedback"])


def test_adaptive_feedback_follows_the_readout_update_with_weight_decay(problem):
    _, _, head_params, _ = problem
    lr, decay, optimizer = LR, DECAY, SGD_DECAY
    history = _train(problem, "eprop", "adaptive", head_params, optimizer)
    # the readout kernel's gradient at the first step, from a linear head (same forward pass)
    linear = {"kernel": head_params["kernel"], "bias": head_params["bias"]}
    first = _train(problem, "eprop", "linear", linear, optimizer, num_steps=1)[0]
    kernel_grad = (head_params["kernel"] - first["head"]["kernel"]) / lr - decay * head_params["kernel"]
    assert np.max(np.abs(kernel_grad)) > 1e-3
    b0 = head_params["feedback"]
    _assert_close(history[0]["head"]["feedback"], b0 - lr * (kernel_grad + decay * b0))
    gap = b0 - head_params["kernel"]
    for t, params in enumerate(history, start=1):
        _assert_close(params["head"]["feedback"] - params["head"]["kernel"], (1 - lr * decay) ** t * gap)


def test_feedback_kind_is_checked():
    with pytest.raises(ValueError, match="random, adaptive"):
        feedback_head("symmetric")


# The config path: `model.feedback` builds these heads for `rtrl-jax train`; its optimizer keeps the
# random matrix fixed even under weight decay (adamw), and with adamw the adaptive matrix, whose
# gradient and Adam moments are the readout kernel's, follows B − W ← (1 − ηλ)(B − W) every step.
CONFIG_LR, ADAMW_DECAY, CONFIG_STEPS = 0.1, 1e-4, 24  # ADAMW_DECAY: optax.adamw's default weight_decay


def _train_from_the_command_line(out, feedback):
    args = [
        "task=evidence",
        "model.cell=lif",
        "model.hidden=4",
        "estimator=eprop",
        f"model.feedback={feedback}",
    ]
    args += ["task_options={num_cues: 1, cue_steps: 2, gap_steps: 1, delay_steps: 2, recall_steps: 2}"]
    args += ["model.dtype=float64", "train.optimizer=adamw", f"train.learning_rate={CONFIG_LR}"]
    args += [
        f"train.steps={CONFIG_STEPS}",
        f"train.chunk_size={CONFIG_STEPS}",
        "train.checkpoint_every=0",
        "train.batch_size=2",
    ]
    assert main(["train", "--quiet", "--out", str(out), *args]) == 0
    initial = build(load_config(out / "config.yaml")).state.params["head"]
    return initial, restore_final_state(out).params["head"]


@pytest.mark.parametrize("feedback", ["random", "adaptive"])
def test_feedback_from_the_config_trains_and_follows_its_rule(tmp_path, feedback):
    initial, final = _train_from_the_command_line(tmp_path / feedback, feedback)
    assert np.max(np.abs(final["kernel"] - initial["kernel"])) > 1e-3
    if feedback == "random":
        np.testing.assert_array_equal(final["feedback"], initial["feedback"])
        return
    assert np.max(np.abs(final["feedback"] - initial["feedback"])) > 1e-3
    decay = (1 - CONFIG_LR * ADAMW_DECAY) ** CONFIG_STEPS
    gap = initial["feedback"] - initial["kernel"]
    _assert_close(final["feedback"] - final["kernel"], decay * gap)
    assert np.max(np.abs(gap)) * (1 - decay) > 1e3 * TOL  # the decay is seen at the tolerance


def test_feedback_config_values_are_checked():
    with pytest.raises(
        ConfigError, match="model.feedback: unknown feedback 'sym'; allowed: symmetric, random"
    ):
        build(load_config(None, ["model.feedback=sym", "model.hidden=2"]))
    with pytest.raises(ConfigError, match="model.feedback: 'random' needs the one-core model"):
        build(load_config(None, ["model.feedback=random", "model.head=mlp", "model.hidden=2"]))
