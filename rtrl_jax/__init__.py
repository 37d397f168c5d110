"""rtrl_jax: online training of recurrent networks with RTRL and its approximations, in JAX."""

from rtrl_jax._src.base import CoreFn, Estimator, flatten_core, influence_matrix, tree_size
from rtrl_jax._src.cells import (
    ELSTMCell,
    LeakyRNNCell,
    LRUCell,
    SparseGRUCell,
    SparseRNNCell,
    random_mask,
)
from rtrl_jax._src.compare import (
    Comparison,
    GradientTrajectory,
    compare_gradients,
    gradient_alignment,
    gradient_bias_variance,
    gradient_trajectory,
)
from rtrl_jax._src.cores import Core, cast_floating, from_function, from_linen, from_nnx
from rtrl_jax._src.kf_rtrl import KFRTRLState, kf_merge, kf_rtrl
from rtrl_jax._src.kronecker import KroneckerState
from rtrl_jax._src.ok import OKState, ok, ok_reduce
from rtrl_jax._src.online import carry_cotangent, online_grad, online_step
from rtrl_jax._src.registry import (
    EstimatorInfo,
    estimator_options,
    get_estimator_info,
    make_estimator,
    register,
    registered,
)
from rtrl_jax._src.rflo import RFLOState, rflo
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
from rtrl_jax._src.snap import (
    SnapLayout,
    SnapState,
    SparsityPatterns,
    find_units,
    snap,
    snap_layout,
    snap_mask,
    snap_mask_from_patterns,
    sparsity_patterns,
)
from rtrl_jax._src.tasks import Stream, Task, add_task, copy_task, sample_batch
from rtrl_jax._src.tbptt import TBPTTState, bptt_value_and_grad, tbptt, unroll
from rtrl_jax._src.train_state import RecurrentTrainState
from rtrl_jax._src.trainer import (
    Head,
    OnlineTrainState,
    StepMetrics,
    init_train_state,
    linear_head,
    make_train_step,
    softmax_cross_entropy,
    train_online,
)
from rtrl_jax._src.uoro import UOROState, uoro

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "Core",
    "CoreFn",
    "ELSTMCell",
    "Estimator",
    "EstimatorInfo",
    "GradientTrajectory",
    "Head",
    "KFRTRLState",
    "KroneckerState",
    "LRUCell",
    "LeakyRNNCell",
    "OKState",
    "OnlineTrainState",
    "RFLOState",
    "RTRLState",
    "RecurrentTrainState",
    "SnapLayout",
    "SnapState",
    "SparseGRUCell",
    "SparseRNNCell",
    "SparsityPatterns",
    "StepMetrics",
    "Stream",
    "TBPTTState",
    "Task",
    "UOROState",
    "add_task",
    "batch_sharding",
    "bptt_value_and_grad",
    "carry_cotangent",
    "cast_floating",
    "compare_gradients",
    "copy_task",
    "dynamics_and_immediate",
    "estimator_options",
    "find_units",
    "flatten_core",
    "from_function",
    "from_linen",
    "from_nnx",
    "get_estimator_info",
    "gradient_alignment",
    "gradient_bias_variance",
    "gradient_trajectory",
    "influence_matrix",
    "init_train_state",
    "kf_merge",
    "kf_rtrl",
    "linear_head",
    "make_estimator",
    "make_mesh",
    "make_train_step",
    "ok",
    "ok_reduce",
    "online_grad",
    "online_step",
    "per_device_bytes",
    "random_mask",
    "register",
    "registered",
    "rflo",
    "rtrl",
    "sample_batch",
    "shard_batch",
    "shard_trace",
    "sharded_step",
    "snap",
    "snap_layout",
    "snap_mask",
    "snap_mask_from_patterns",
    "softmax_cross_entropy",
    "sparsity_patterns",
    "tbptt",
    "trace_sharding",
    "train_online",
    "tree_size",
    "unroll",
    "uoro",
]
