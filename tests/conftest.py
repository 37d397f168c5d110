"""Test configuration: float64 is available everywhere (exactness tests use it explicitly).

XLA:CPU's multi-threaded Eigen pool was seen (jaxlib 0.10.2, 2-core machine) to wedge once on the
wide vmapped r-OK sampling of ``test_kronecker.py`` (every thread parked, the result never ready; not
reproduced in 150 reruns of the same computation). The tests' matrices are small, so Eigen runs
single-threaded here: a rare third-party deadlock must not hang the test run.
"""

import os

FLAGS = os.environ.get("XLA_FLAGS", "")
if "--xla_cpu_multi_thread_eigen" not in FLAGS:
    os.environ["XLA_FLAGS"] = f"{FLAGS} --xla_cpu_multi_thread_eigen=false".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
