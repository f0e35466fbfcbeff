"""Orbax checkpoints in the workdir: save every N steps, keep the last K, resume exactly.

A checkpoint step holds three items:
  params   the trainable params (the policy, or the adapters): ``restore_params`` reads them
           alone, with no optimizer built (generate.py, export)
  opt      the rest of the train state: optimizer state, step, the non-finite flag
  record   JSON: data cursor, rng, the model's architecture, the run's settings
Checkpoints of the previous format (one ``state`` item holding params, optimizer state and step)
are read too.

Orbax writes each step into a temporary folder and renames it when complete, so a save cut short
by a kill is never taken for a checkpoint; a step folder without orbax's commit files is skipped
with a warning. Each record also holds a checksum of the params and of the rest of the state,
computed on the device as they are saved: ``restore`` checks it and that every float is finite,
so flipped bytes or a truncated file are found (``DamagedCheckpoint``) rather than trained on or
exported; ``restore_latest_good`` then moves the damaged step aside and takes the one before.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dpo_jax import storage
from dpo_jax.errors import DpoError
from dpo_jax.models import common

log = logging.getLogger(__name__)

_COMMIT_FILES = ("_CHECKPOINT_METADATA",)
_GCS_COMMIT = "commit_success.txt"
_OLD_STATE = "state"  # the single item of the previous format


class CheckpointMismatch(DpoError, ValueError):
    """The workdir's checkpoint was written for another model or run."""


class DamagedCheckpoint(DpoError):
    """A checkpoint that cannot be read back as it was written."""


class CheckpointWriteError(DpoError, OSError):
    """A checkpoint that could not be written (a full disk, a file-size limit, permissions)."""


def _first_line(e: Exception) -> str:
    """An orbax / tensorstore error in one line: for a failed write, the file and the OS's
    reason (tensorstore buries them in a long message); else the first line, shortened."""
    text = str(e).strip()
    # the reason may be followed by other [key=value] blocks (a tensorstore_spec) before the
    # OS error code
    m = re.search(r'Failed writing: "([^"]+)": (?:Failed to write[^:]*: )?([^\[]+?)\s*'
                  r'\[.*os_error_code', text, re.DOTALL)
    if m:
        return f"{m.group(2)}: {m.group(1)}"
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


@jax.jit
def checksum(tree):
    """(leaves, 2) uint32: per leaf, the sum of its 32-bit words and their position-weighted sum
    (mod 2^32). Any flipped bit changes the first; swapped words change the second."""
    out = []
    for leaf in jax.tree.leaves(tree):
        x = leaf.reshape(-1)
        size = x.dtype.itemsize
        if size == 8:
            x = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
        elif size == 4:
            x = jax.lax.bitcast_convert_type(x, jnp.uint32)
        else:
            x = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size])
            x = x.astype(jnp.uint32)
        pos = jnp.arange(1, x.size + 1, dtype=jnp.uint32)
        out.append(jnp.stack([jnp.sum(x, dtype=jnp.uint32), jnp.sum(x * pos, dtype=jnp.uint32)]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def all_finite(tree) -> bool:
    """Whether every float in the tree is finite (one device round trip)."""
    floats = [a for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
    return bool(jax.jit(lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in t])))(
        floats)) if floats else True


class Checkpointer:
    def __init__(self, directory, *, max_to_keep: int | None = 3, async_save: bool = True):
        self.remote = storage.is_remote(directory)
        self.directory = directory if self.remote else Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def _complete(self, step: int) -> bool:
        d = self.directory / str(step)
        # On an object store orbax writes the step in place (no atomic rename) and marks its
        # end with commit_success.txt.
        return all((d / f).exists() for f in _COMMIT_FILES + (_GCS_COMMIT,) * self.remote)

    def latest_step(self) -> int | None:
        """The newest complete step (read from the folder, so it also answers after close)."""
        steps = sorted((int(p.name) for p in self.directory.iterdir() if p.name.isdigit()),
                       reverse=True) if self.directory.is_dir() else []
        for s in steps:
            if self._complete(s):
                return s
            log.warning("%s: step %d is incomplete; ignoring it", self.directory, s)
        return None

    def save(self, step: int, state: dict, record: dict):
        """Asynchronous: returns once the arrays are copied off the device."""
        self._check_space(state)
        rest = {k: v for k, v in state.items() if k != "params"}
        record = dict(record, checksum={"params": np.asarray(checksum(state["params"])).tolist(),
                                        "opt": np.asarray(checksum(rest)).tolist()})
        try:  # also raises the failure of the previous (asynchronous) save
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]), opt=ocp.args.StandardSave(rest),
                record=ocp.args.JsonSave(record)), force=True)
        except Exception as e:
            raise CheckpointWriteError(f"a checkpoint could not be written in {self.directory} "
                                       f"({_first_line(e)})") from None

    def _check_space(self, state):
        """A full disk found before orbax starts writing (its failure comes from background
        threads, long after the cause): the new step needs room while the old ones remain."""
        if self.remote:  # a bucket has no free-space figure; a failed write names the object
            return
        need = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < 1.1 * need + (16 << 20):
            raise CheckpointWriteError(
                f"{self.directory}: {free / 2**20:.0f} MiB free, but a checkpoint needs about "
                f"{need / 2**20:.0f} MiB; free some space (the last complete checkpoint is kept)")

    def record(self, step: int) -> dict:
        return self._read(step, record=ocp.args.JsonRestore())["record"]

    def check_record(self, step: int, record: dict, expect: dict | None, check=None):
        """What the checkpoint must have been written for: ``expect["model_config"]`` (the
        architecture); ``check(record, where)``, the tuning method's own check of its record
        (``dpo_jax.tuning``). A difference is a CheckpointMismatch naming it, before any state
        is read."""
        where = self.directory / str(step)
        want = (expect or {}).get("model_config")
        have = record.get("model_config")  # (none in records written before it was kept)
        # (a field the record lacks was added to the family after it was written: its
        # default is what that checkpoint was trained with)
        diff = {k: (have[k], want.get(k)) for k in sorted(have)
                if have[k] != want.get(k)} if want is not None and have is not None else {}
        if diff:
            raise CheckpointMismatch(f"{where} holds a checkpoint of another model (saved vs "
                                     f"this config: {diff}); use a fresh --workdir or the "
                                     "matching config")
        if check is not None:
            check(record, where)

    def _old_format(self, step: int) -> bool:
        return (self.directory / str(step) / _OLD_STATE).is_dir()

    def restore(self, step: int, abstract_state: dict, *, expect: dict | None = None,
                check=None):
        """(state, record) of ``step``; the state takes the shardings of ``abstract_state``'s
        leaves (jax.ShapeDtypeStruct with .sharding), so a run may resume on another mesh.
        ``expect``, ``check``: see ``check_record``."""
        record = self.record(step)
        self.check_record(step, record, expect, check)
        if self._old_format(step):
            target = {k: v for k, v in abstract_state.items() if k != "bad_step"}
            state = self._read(step, **{_OLD_STATE: ocp.args.StandardRestore(target)})[_OLD_STATE]
            self._verify(step, record, state=state)
            state["bad_step"] = jnp.zeros((), jnp.int32)
            return state, record
        rest = {k: v for k, v in abstract_state.items() if k != "params"}
        out = self._read(step, params=ocp.args.StandardRestore(abstract_state["params"]),
                         opt=ocp.args.StandardRestore(rest))
        self._verify(step, record, params=out["params"], opt=out["opt"])
        return {"params": out["params"], **out["opt"]}, record

    def _read(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # tensorstore / orbax errors on truncated or mangled files
            raise DamagedCheckpoint(f"{self.directory / str(step)} cannot be read "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None

    def _verify(self, step: int, record: dict, **parts):
        sums = record.get("checksum") or {}
        for name, tree in parts.items():
            if name in sums and np.asarray(checksum(tree)).tolist() != sums[name]:
                raise DamagedCheckpoint(f"{self.directory / str(step)}: the {name} do not match "
                                        "the checksum written with them (a damaged file)")
            if not all_finite(tree):
                raise DamagedCheckpoint(f"{self.directory / str(step)}: the {name} hold "
                                        "non-finite values")

    def restore_latest_good(self, abstract_state: dict, *, expect: dict | None = None,
                            check=None):
        """(step, state, record) of the newest checkpoint that reads back intact, or None.

        A damaged step is reported, moved aside (``<step>.damaged``, kept for inspection) and
        the one before it tried. A checkpoint of another model is an error, not damage.
        """
        self._set_aside_incomplete()
        while (step := self.latest_step()) is not None:
            try:
                state, record = self.restore(step, abstract_state, expect=expect, check=check)
                return step, state, record
            except DamagedCheckpoint as e:
                aside = self.directory / f"{step}.damaged"
                log.warning("%s; moving it to %s and resuming from the checkpoint before it",
                            e, aside)
                if jax.process_index() == 0:
                    storage.move(self.directory / str(step), aside)
                self.manager.reload()
        return None

    def restore_params(self, step: int, abstract_params, *, expect: dict | None = None,
                       check=None):
        """The trainable params of ``step`` alone (no optimizer state is read or built)."""
        record = self.record(step)
        self.check_record(step, record, expect, check)
        if self._old_format(step):
            # the old single item holds the optimizer state too: read it as saved, keep the params
            old = self._read(step, **{_OLD_STATE: ocp.args.StandardRestore()})[_OLD_STATE]
            params = jax.tree.map(lambda a, t: jax.device_put(jnp.asarray(a, t.dtype), t.sharding)
                                  if getattr(t, "sharding", None) is not None
                                  else jnp.asarray(a, t.dtype), old["params"], abstract_params)
        else:
            params = self._read(step, params=ocp.args.StandardRestore(abstract_params))["params"]
        self._verify(step, record, params=params)
        return params

    def _set_aside_incomplete(self):
        """Step folders a kill left without orbax's commit files would block a later save of
        that step: renamed ``<step>.incomplete`` (kept for inspection)."""
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.name.isdigit() and not self._complete(int(p.name)):
                log.warning("%s has no commit files (a save cut short); moving it to %s", p,
                            p.with_name(f"{p.name}.incomplete"))
                storage.move(p, p.with_name(f"{p.name}.incomplete"))
        self.manager.reload()

    def wait(self):
        """Waits for a save in flight; its failure is a CheckpointWriteError naming the folder."""
        if self.manager is not None:
            try:
                self.manager.wait_until_finished()
            except Exception as e:
                raise CheckpointWriteError(f"a checkpoint could not be written in "
                                           f"{self.directory} ({_first_line(e)})") from None

    def close(self):
        """Waits for a save in flight and closes; a second call does nothing."""
        if self.manager is None:
            return
        try:
            self.wait()
        finally:
            manager, self.manager = self.manager, None
            try:
                manager.close()
            except Exception as e:  # already reported by wait()
                log.debug("closing the checkpoint manager: %s", e)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: orbax's restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def model_config_record(cfg) -> dict:
    """The fields of a model config that fix parameter shapes (compute options do not), as the
    record's JSON holds them (tuples as lists), so a record compares equal to its config."""
    return json.loads(json.dumps(common.architecture(cfg)))
