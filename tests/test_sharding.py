"""Sharding exact RTRL's trace along parameters and streams along data (jax.sharding).

The multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX
starts, so they run this file as a script in a subprocess; the default ``python -m pytest`` run
exercises them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax as rj

pytestmark = pytest.mark.x64  # float64 exactness checks

DEVICES = 4
T = 6


def _problem(cell, batch=4):
    core = rj.from_linen(cell, 3)
    params, carry = core.init(jax.random.PRNGKey(0), jnp.float64)
    carries = jnp.stack([carry] * batch) if not isinstance(carry, tuple) else None
    if carries is None:
        carries = jax.tree.map(lambda c: jnp.stack([c] * batch), carry)
    xs = jax.random.normal(jax.random.PRNGKey(1), (T, batch, 3), jnp.float64)
    return core, params, carry, carries, xs


def _run(step, traces, params, carries, xs, keys):
    for t in range(T):
        carries, _, traces = step(traces, params, carries, xs[t], keys[t])
    return carries, traces


def _compare(cell, mesh, name="rtrl", options=None):
    """Runs the batched estimator sharded on ``mesh`` and on one device; returns max error and
    the per-device / total trace bytes."""
    core, params, carry, carries, xs = _problem(cell)
    estimator = rj.make_estimator(name, core, **(options or {}))
    init = jax.vmap(lambda c: estimator.init(params, c, key=jax.random.PRNGKey(2)))
    keys = jax.random.split(jax.random.PRNGKey(3), (T, xs.shape[1]))

    plain = jax.jit(
        jax.vmap(lambda tr, c, x, k: estimator.step(tr, params, c, x, key=k)),
    )
    ref_carries, ref_traces = _run(
        lambda tr, p, c, x, k: plain(tr, c, x, k), init(carries), params, carries, xs, keys
    )

    step = rj.sharded_step(estimator, mesh, batched=True)
    traces = rj.shard_trace(init(carries), mesh, batched=True)
    sh_carries, sh_traces = _run(
        step,
        traces,
        rj.shard_batch(params, mesh, batched=False),
        rj.shard_batch(carries, mesh),
        rj.shard_batch(xs, mesh, batched=False),
        keys,
    )
    error = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(
            jax.tree.leaves((sh_carries, sh_traces)),
            jax.tree.leaves((ref_carries, ref_traces)),
            strict=True,
        )
    )
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(sh_traces))
    return error, rj.per_device_bytes(sh_traces), total, str(jax.tree.leaves(sh_traces)[0].sharding)


def _multi_device_report():
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == DEVICES, jax.devices()
    report = {}
    for label, cell, shape in [
        ("rnn_params4", nn.SimpleCell(4), (1, 4)),
        ("gru_params4", nn.GRUCell(4), (1, 4)),
        ("rnn_data2_params2", nn.SimpleCell(4), (2, 2)),
    ]:
        mesh = rj.make_mesh(data_shards=shape[0], param_shards=shape[1])
        error, per_device, total, sharding = _compare(cell, mesh)
        report[label] = {
            "error": error,
            "per_device": per_device,
            "total": total,
            "sharding": sharding,
        }
    # Every registered estimator runs under the data axis (traces sharded by stream).
    mesh = rj.make_mesh(data_shards=4, param_shards=1)
    for info in rj.registered():
        try:
            error, _, _, _ = _compare(nn.SimpleCell(4), mesh, info.name, info.example_options)
        except ValueError as e:  # cannot serve this core
            report[f"registered_{info.name}"] = {"skipped": str(e)}
            continue
        report[f"registered_{info.name}"] = {"error": error}
    indivisible = rj.trace_sharding(rj.make_mesh(), rj.RTRLState(np.zeros((7, 3))))
    report["indivisible_spec"] = str(indivisible.influence.spec)
    print("REPORT " + json.dumps(report))


@pytest.fixture(scope="module")
def multi_device_report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


@pytest.mark.parametrize("label", ["rnn_params4", "gru_params4", "rnn_data2_params2"])
def test_sharded_rtrl_equals_single_device(multi_device_report, label):
    assert multi_device_report[label]["error"] <= 1e-12


@pytest.mark.parametrize("label", ["rnn_params4", "gru_params4"])
def test_per_device_trace_is_a_quarter(multi_device_report, label):
    entry = multi_device_report[label]
    assert entry["per_device"] * DEVICES == entry["total"], entry


def test_data_and_param_axes_split_the_trace(multi_device_report):
    entry = multi_device_report["rnn_data2_params2"]
    assert entry["per_device"] * DEVICES == entry["total"], entry
    assert "'data'" in entry["sharding"] and "'params'" in entry["sharding"]


def test_every_registered_estimator_runs_sharded(multi_device_report):
    ran = [r for k, r in multi_device_report.items() if k.startswith("registered_") and "error" in r]
    assert len(ran) >= 2
    for name, entry in multi_device_report.items():
        if name.startswith("registered_"):
            # built with its example options, an estimator is skipped only for a core it cannot serve
            assert "cannot serve" in entry.get("skipped", "cannot serve"), (name, entry)
        if name.startswith("registered_") and "error" in entry:
            assert entry["error"] <= 1e-12, name


def test_same_code_on_one_device():
    mesh = rj.make_mesh(devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "params": 1}
    error, per_device, total, _ = _compare(nn.SimpleCell(4), mesh)
    assert error <= 1e-12
    assert per_device == total


def test_mesh_errors():
    with pytest.raises(ValueError, match="does not divide"):
        rj.make_mesh(data_shards=3, devices=jax.devices()[:1] * 2)
    with pytest.raises(ValueError, match="needs"):
        rj.make_mesh(param_shards=2, devices=jax.devices()[:1])


def test_indivisible_rows_are_replicated(multi_device_report):
    assert "params" not in multi_device_report["indivisible_spec"]


if __name__ == "__main__":
    _multi_device_report()
