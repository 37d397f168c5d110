"""Checkpoints of an online run with Orbax, verified by a checksum, with fallback to the last good one.

A checkpoint is the whole :class:`~rtrl_jax.OnlineTrainState` (parameters, optimizer
state, carries, estimator traces, random key, and the data position ``step``) plus a small JSON
record of the step and a SHA-256 of every leaf's bytes. Orbax writes each checkpoint to a temporary
folder and renames it when complete, so a write cut short never looks finished; a checkpoint whose
files were damaged afterwards fails to restore or fails the checksum, is moved aside to
``<directory>/../corrupt_checkpoints/`` with a warning, and the previous one is used.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def tree_checksum(tree: Any) -> str:
    """SHA-256 over the structure, dtypes, shapes and bytes of every leaf of ``tree``."""
    digest = hashlib.sha256(str(jax.tree.structure(tree)).encode())
    for leaf in jax.tree.leaves(tree):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error's message, cut to ``limit`` characters (storage errors can dump
    whole specs)."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


class CheckpointWarning(UserWarning):
    """A checkpoint could not be used and an earlier one is tried."""


class Checkpointer:
    """Saves and restores run states under ``directory`` (synchronously), keeping the last ``keep``.

    Example::

        checkpointer = Checkpointer(run_dir / "checkpoints")
        checkpointer.save(state)
        restored = checkpointer.restore_latest(like=state)  # None when there is no usable one
    """

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, enable_async_checkpointing=False, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """The steps of the finished checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, state: Any) -> int:
        """Saves ``state`` as the checkpoint of step ``state.step`` (replacing one of that step)."""
        step = int(state.step)
        if step in self._manager.all_steps():
            self._manager.delete(step)
        meta = {"step": step, "checksum": tree_checksum(state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
        return step

    def restore(self, step: int, like: Any) -> Any:
        """The state of checkpoint ``step`` with the structure of ``like``; raises if it is damaged."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        state, meta = restored["state"], restored["meta"]
        if meta.get("step") != step or int(state.step) != step:
            raise ValueError(f"checkpoint {step} holds step {meta.get('step')} / {int(state.step)}.")
        if tree_checksum(state) != meta.get("checksum"):
            raise ValueError(f"checkpoint {step} fails its checksum.")
        return state

    def restore_latest(self, like: Any) -> Any | None:
        """The newest checkpoint that restores and passes its checksum, or ``None`` if none does.

        Damaged checkpoints newer than it are moved to ``corrupt_checkpoints/`` next to the folder.
        """
        for step in reversed(self.steps()):
            try:
                return self.restore(step, like)
            except Exception as error:  # noqa: BLE001 - any failure to read means: use an older one
                warnings.warn(
                    f"checkpoint at step {step} in {str(self.directory)!r} is unusable "
                    f"({type(error).__name__}: {_first_line(error)}); trying the previous one.",
                    CheckpointWarning,
                    stacklevel=2,
                )
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        aside = self.directory.parent / "corrupt_checkpoints"
        aside.mkdir(exist_ok=True)
        for path in self.directory.iterdir():
            if path.name == str(step):
                target = aside / path.name
                if target.exists():
                    shutil.rmtree(target)
                shutil.move(str(path), str(target))
        self._manager.close()
        self._open()

    def close(self) -> None:
        self._manager.close()
