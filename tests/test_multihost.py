"""Two JAX processes on this machine (localhost coordinator, CPU collectives over gloo) train a
sharded exact-RTRL model: the result equals the single-process run and each process holds only its
share of the trace. The processes run ``tests/multihost_worker.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import rtrl_jax as rj

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multihost_worker as worker  # noqa: E402

PROCESSES = 2
LOCAL_DEVICES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _reference():
    core, params, carries, xs, targets = worker.problem()
    estimator = rj.rtrl(core)
    grads_fn, update_fn = worker.train_functions(core, estimator)

    @jax.jit
    def run(params, carries):
        traces = jax.vmap(lambda c: estimator.init(params, c))(carries)
        grads = None
        for t in range(worker.STEPS):
            carries, _, traces = jax.vmap(estimator.step, in_axes=(0, None, 0, 0))(
                traces, params, carries, xs[t]
            )
            grads = grads_fn(traces, params, carries, targets[t])
            params = update_fn(params, grads)
        return params, grads

    return run(params, carries)


@pytest.mark.slow  # two JAX processes start, connect and compile (76 s on the shared 2-core machine)
def test_two_processes_train_sharded_rtrl_like_one(tmp_path, x64):
    out = tmp_path / "result.json"
    port = _free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
    }
    script = Path(worker.__file__)
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(PROCESSES), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    logs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), "\n\n".join(logs)
    record = json.loads(out.read_text())
    assert record["devices"] == PROCESSES * LOCAL_DEVICES and record["local_devices"] == LOCAL_DEVICES

    params, grads = _reference()
    for name, want in (("params", params), ("grads", grads)):
        got = jax.tree.map(np.asarray, record[name], is_leaf=lambda x: isinstance(x, list))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, np.asarray(w), rtol=1e-12, atol=1e-12, err_msg=name)

    total = record["trace_bytes_total"]
    assert record["trace_bytes_per_process"] == [total // PROCESSES] * PROCESSES
    assert record["per_device_bytes"] == total // (PROCESSES * LOCAL_DEVICES)
