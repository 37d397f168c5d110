"""The experiment layer: specs, one ``build``, run folders, checkpoints, the compare job and plots.

It sits on top of the library (``rtrl_jax``) and the library never imports it. ``rtrl-jax`` (the
command line) and the learning benchmarks in ``benchmarks/`` are thin layers over it::

    from rtrl_jax import experiment

    spec = experiment.load_config("configs/add_gru_tbptt.yaml", ["train.steps=500"])
    built = experiment.build(spec)  # ConfigError naming the key for anything that cannot be built
    summary = experiment.run_training(built, "runs/add")

``model.layers=2`` (and the other ``model.*`` keys of :class:`ModelConfig`) make the run a whole
Flax model, an :class:`OnlineStack` of online recurrent layers, trained by
:func:`rtrl_jax.train_model_online`.
"""

from rtrl_jax.experiment.build import (
    CompareJob,
    Experiment,
    Layer,
    build,
    build_core,
    build_estimator,
    build_model,
    build_optimizer,
    build_task,
    check_name,
    enable_dtype,
    init_head,
    is_one_core,
)
from rtrl_jax.experiment.checkpoint import Checkpointer, CheckpointWarning, tree_checksum
from rtrl_jax.experiment.compare import markdown_table, run_compare
from rtrl_jax.experiment.names import (
    CELLS,
    DTYPES,
    HEADS,
    NONFINITE_POLICIES,
    NORMS,
    OPTIMIZERS,
    SCHEDULES,
    TASKS,
    register_cell,
    register_task,
)
from rtrl_jax.experiment.plot import plot_comparison, plot_run
from rtrl_jax.experiment.run import (
    METRIC_COLUMNS,
    RunError,
    read_metrics,
    restore_final_state,
    run_training,
    train,
    write_metrics,
)
from rtrl_jax.experiment.spec import (
    CompareConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    TrainConfig,
    from_data,
    load_compare_config,
    load_config,
    parse_override,
    read_yaml,
    to_dict,
)
from rtrl_jax.experiment.stack import OnlineStack

__all__ = [
    "CELLS",
    "DTYPES",
    "HEADS",
    "METRIC_COLUMNS",
    "NONFINITE_POLICIES",
    "NORMS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TASKS",
    "CheckpointWarning",
    "Checkpointer",
    "CompareConfig",
    "CompareJob",
    "ConfigError",
    "Experiment",
    "Layer",
    "ModelConfig",
    "OnlineStack",
    "RunConfig",
    "RunError",
    "TrainConfig",
    "build",
    "build_core",
    "build_estimator",
    "build_model",
    "build_optimizer",
    "build_task",
    "check_name",
    "enable_dtype",
    "from_data",
    "init_head",
    "is_one_core",
    "load_compare_config",
    "load_config",
    "markdown_table",
    "parse_override",
    "plot_comparison",
    "plot_run",
    "read_metrics",
    "read_yaml",
    "register_cell",
    "register_task",
    "restore_final_state",
    "run_compare",
    "run_training",
    "to_dict",
    "train",
    "tree_checksum",
    "write_metrics",
]
