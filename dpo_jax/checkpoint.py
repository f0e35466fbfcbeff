"""Orbax checkpoints in the workdir: save every N steps, keep the last K, resume exactly.

A checkpoint step holds three items:
  params   the trainable params (the policy, or LoRA's adapters): ``restore_params`` reads them
           alone, with no optimizer built (generate.py, export)
  opt      the rest of the train state: optimizer state, step, the non-finite flag
  record   JSON: data cursor, rng, the model's architecture, the run's settings
Checkpoints of the previous format (one ``state`` item holding params, optimizer state and step)
are read too.

Orbax writes each step into a temporary folder and renames it when complete, so a save cut short
by a kill is never taken for a checkpoint; a step folder without orbax's commit files is skipped
with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dpo_jax.models import common

log = logging.getLogger(__name__)

_COMMIT_FILES = ("_CHECKPOINT_METADATA",)
_OLD_STATE = "state"  # the single item of the previous format


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

    def save(self, step: int, state: dict, record: dict):
        """Asynchronous: returns once the arrays are copied off the device."""
        rest = {k: v for k, v in state.items() if k != "params"}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]), opt=ocp.args.StandardSave(rest),
            record=ocp.args.JsonSave(record)), force=True)

    def record(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore()))["record"]

    def check_model(self, step: int, record: dict, model_config: dict | None):
        if model_config is None or record.get("model_config") == model_config:
            return
        saved = record.get("model_config") or {}
        diff = {k: (saved.get(k), model_config.get(k))
                for k in sorted(set(saved) | set(model_config))
                if saved.get(k) != model_config.get(k)}
        raise CheckpointMismatch(
            f"{self.directory / str(step)} holds a checkpoint of another model "
            f"(saved vs this config: {diff}); use a fresh --workdir or the matching config")

    def _old_format(self, step: int) -> bool:
        return (self.directory / str(step) / _OLD_STATE).is_dir()

    def restore(self, step: int, abstract_state: dict, *, model_config: dict | None = None):
        """(state, record) of ``step``; the state takes the shardings of ``abstract_state``'s
        leaves (jax.ShapeDtypeStruct with .sharding), so a run may resume on another mesh."""
        record = self.record(step)
        self.check_model(step, record, model_config)
        if self._old_format(step):
            target = {k: v for k, v in abstract_state.items() if k != "bad_step"}
            state = self.manager.restore(step, args=ocp.args.Composite(
                **{_OLD_STATE: ocp.args.StandardRestore(target)}))[_OLD_STATE]
            state["bad_step"] = jnp.zeros((), jnp.int32)
            return state, record
        rest = {k: v for k, v in abstract_state.items() if k != "params"}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt=ocp.args.StandardRestore(rest)))
        return {"params": out["params"], **out["opt"]}, record

    def restore_params(self, step: int, abstract_params, *, model_config: dict | None = None):
        """The trainable params of ``step`` alone (no optimizer state is read or built)."""
        record = self.record(step)
        self.check_model(step, record, model_config)
        if self._old_format(step):
            # the old single item holds the optimizer state too: read it as saved, keep the params
            old = self.manager.restore(step, args=ocp.args.Composite(
                **{_OLD_STATE: ocp.args.StandardRestore()}))[_OLD_STATE]
            return jax.tree.map(lambda a, t: jax.device_put(jnp.asarray(a, t.dtype), t.sharding)
                                if getattr(t, "sharding", None) is not None
                                else jnp.asarray(a, t.dtype), old["params"], abstract_params)
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: orbax's restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def model_config_record(cfg) -> dict:
    """The fields of a model config that fix parameter shapes (compute options do not)."""
    return common.architecture(cfg)
