"""One process of the multi-host run of ``tests/test_multihost.py`` (not a test file itself).

``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT``: joins the run coordinated
at ``localhost:PORT`` (``jax.distributed.initialize``, CPU collectives over gloo), builds the global
``(data, params)`` mesh of docs/scaling.md — the data axis across processes, the parameter axis
over each process's local devices — and trains a sharded exact-RTRL model for :data:`STEPS` steps
(online SGD on the batch-mean gradient). Process 0 writes the final parameters, the last gradient
and, per process, the bytes of the trace it holds, as JSON to ``OUT``.

The problem (cell, sizes, data, learning rate) is :func:`problem`, shared with the test's
single-process reference.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np

STEPS = 4
BATCH = 4
HIDDEN = 4
INPUT = 3
LEARNING_RATE = 0.1


def problem():
    """``(core, params, carries, xs, targets)`` of the run, float64."""
    import flax.linen as nn

    import rtrl_jax as rj

    core = rj.from_linen(nn.SimpleCell(features=HIDDEN), INPUT)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    carries = jnp.stack([carry] * BATCH)
    xs = jax.random.normal(jax.random.PRNGKey(1), (STEPS, BATCH, INPUT), jnp.float64)
    targets = jax.random.normal(jax.random.PRNGKey(2), (STEPS, BATCH, HIDDEN), jnp.float64)
    return core, params, carries, xs, targets


def train_functions(core, estimator):
    """``(grads, update)``: the batch-mean online gradient of ``½‖h_t - y_t‖²`` and the SGD step."""

    def grads(traces, params, carries, targets):
        per_stream = jax.vmap(estimator.grad, in_axes=(0, None, 0))(traces, params, carries - targets)
        return jax.tree.map(lambda g: g.mean(0), per_stream)

    def update(params, grads):
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)

    return grads, update


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id
    )
    import rtrl_jax as rj

    core, params, carries, xs, targets = problem()
    estimator = rj.rtrl(core, row_blocks=1)
    mesh = rj.make_mesh(data_shards=jax.process_count(), param_shards=jax.local_device_count())

    def place(tree, shardings):
        # Every process holds the whole (small, deterministic) host data and hands over its shards.
        return jax.tree.map(
            lambda a, s: jax.make_array_from_callback(
                np.shape(a), s, lambda index, a=a: np.asarray(a)[index]
            ),
            tree,
            shardings,
        )

    traces = jax.vmap(lambda c: estimator.init(params, c))(carries)
    traces = place(traces, rj.trace_sharding(mesh, traces, batched=True))
    carries = place(carries, rj.batch_sharding(mesh, carries))
    params = place(params, rj.batch_sharding(mesh, params, batched=False))
    step = rj.sharded_step(estimator, mesh, batched=True)
    grads_fn, update_fn = train_functions(core, estimator)
    replicated = rj.batch_sharding(mesh, params, batched=False)
    grads_fn = jax.jit(grads_fn, out_shardings=replicated)
    update_fn = jax.jit(update_fn, out_shardings=replicated)
    for t in range(STEPS):
        x = place(xs[t], rj.batch_sharding(mesh, xs[t]))
        y = place(targets[t], rj.batch_sharding(mesh, targets[t]))
        carries, _, traces = step(traces, params, carries, x)
        grads = grads_fn(traces, params, carries, y)
        params = update_fn(params, grads)

    local = sum(shard.data.nbytes for leaf in jax.tree.leaves(traces) for shard in leaf.addressable_shards)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(traces))
    held = np.asarray(
        jax.experimental.multihost_utils.process_allgather(np.array([local], np.int64)), np.int64
    ).ravel()
    if process_id == 0:

        def host(tree):
            return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)).tolist(), tree)

        record = {
            "params": host(params),
            "grads": host(grads),
            "trace_bytes_total": int(total),
            "trace_bytes_per_process": held.tolist(),
            "per_device_bytes": rj.per_device_bytes(traces),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
        }
        with open(out, "w") as f:
            json.dump(record, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
