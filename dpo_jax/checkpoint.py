"""Orbax checkpoints in the workdir: save every N steps, keep the last K, resume exactly.

A checkpoint holds the train state pytree (params, optimizer state, step) and a JSON record with
the data cursor, the rng and the model's config. Orbax writes each step into a temporary folder
and renames it when complete, so a save cut short by a kill is never taken for a checkpoint; we
also skip any step folder without orbax's commit files, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_COMMIT_FILES = ("_CHECKPOINT_METADATA",)


class CheckpointMismatch(ValueError):
    """The workdir's checkpoint was written for another model or run."""


class Checkpointer:
    def __init__(self, directory, *, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def _complete(self, step: int) -> bool:
        d = self.directory / str(step)
        return all((d / f).exists() for f in _COMMIT_FILES)

    def latest_step(self) -> int | None:
        steps = sorted(self.manager.all_steps(), reverse=True)
        for s in steps:
            if self._complete(s):
                return s
            log.warning("%s: step %d is incomplete; ignoring it", self.directory, s)
        return None

    def save(self, step: int, state, record: dict):
        """Asynchronous: returns once the arrays are copied off the device."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)

    def restore(self, step: int, abstract_state, *, model_config: dict | None = None):
        """(state, record) of ``step``; the state takes the shardings of ``abstract_state``'s
        leaves (jax.ShapeDtypeStruct with .sharding), so a run may resume on another mesh."""
        record = self.manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore()))["record"]
        if model_config is not None and record.get("model_config") != model_config:
            saved = record.get("model_config") or {}
            diff = {k: (saved.get(k), model_config.get(k))
                    for k in sorted(set(saved) | set(model_config))
                    if saved.get(k) != model_config.get(k)}
            raise CheckpointMismatch(
                f"{self.directory / str(step)} holds a checkpoint of another model "
                f"(saved vs this config: {diff}); use a fresh --workdir or the matching config")
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        return state, record

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: orbax's restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def model_config_record(cfg) -> dict:
    """The fields of a GPT2Config that fix parameter shapes (compute options do not)."""
    d = dataclasses.asdict(cfg)
    for compute_option in ("dtype", "remat", "remat_policy"):
        d.pop(compute_option, None)
    return d
