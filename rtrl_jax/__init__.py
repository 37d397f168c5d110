"""rtrl_jax: online training of recurrent networks with RTRL and its approximations, in JAX."""

from rtrl_jax._src.base import CoreFn, Estimator, flatten_core, influence_matrix, tree_size
from rtrl_jax._src.cores import Core, cast_floating, from_function, from_linen, from_nnx
from rtrl_jax._src.online import carry_cotangent, online_grad, online_step
from rtrl_jax._src.registry import (
    EstimatorInfo,
    estimator_options,
    get_estimator_info,
    make_estimator,
    register,
    registered,
)
from rtrl_jax._src.rtrl import RTRLState, dynamics_and_immediate, rtrl
from rtrl_jax._src.sharding import (
    batch_sharding,
    make_mesh,
    per_device_bytes,
    shard_batch,
    shard_trace,
    sharded_step,
    trace_sharding,
)
from rtrl_jax._src.tbptt import TBPTTState, bptt_value_and_grad, tbptt, unroll

__version__ = "0.1.0"

__all__ = [
    "Core",
    "CoreFn",
    "Estimator",
    "EstimatorInfo",
    "RTRLState",
    "TBPTTState",
    "batch_sharding",
    "bptt_value_and_grad",
    "carry_cotangent",
    "cast_floating",
    "dynamics_and_immediate",
    "estimator_options",
    "flatten_core",
    "from_function",
    "from_linen",
    "from_nnx",
    "get_estimator_info",
    "influence_matrix",
    "make_estimator",
    "make_mesh",
    "online_grad",
    "online_step",
    "per_device_bytes",
    "register",
    "registered",
    "rtrl",
    "shard_batch",
    "shard_trace",
    "sharded_step",
    "tbptt",
    "trace_sharding",
    "tree_size",
    "unroll",
]
