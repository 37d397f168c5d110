"""Shared by the learning tests: an online run on the add task and its final loss."""

import jax
import numpy as np
import optax

import rtrl_jax


def add_task_loss(core, estimator, *, readout_only=False, steps=3000, batch=16, seed=0):
    """Mean step loss over the last fifth of an online run on the add task (t1=5, t2=9)."""

    params, _ = core.init(jax.random.PRNGKey(seed))
    head = rtrl_jax.linear_head()
    head_params = head.init(jax.random.PRNGKey(seed + 1), core.output(core.initial_carry()).shape[0], 2)
    optimizer = optax.adam(3e-3)
    if readout_only:
        optimizer = optax.multi_transform(
            {"core": optax.set_to_zero(), "head": optax.adam(3e-3)}, {"core": "core", "head": "head"}
        )
    state = rtrl_jax.init_train_state(
        core, estimator, optimizer, params, head_params, batch_size=batch, key=jax.random.PRNGKey(2)
    )
    stream = rtrl_jax.sample_batch(rtrl_jax.add_task(5, 9), jax.random.PRNGKey(seed + 3), steps, batch)
    _, metrics = rtrl_jax.train_online(core, estimator, optimizer, stream, state, chunk_size=steps)
    loss = metrics.loss / metrics.weight
    return float(np.mean(loss[-steps // 5 :]))
