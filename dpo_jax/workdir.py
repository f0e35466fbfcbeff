"""The workdir of a run: one run at a time, its settings kept, a resume checked against them.

- ``Lock``: an exclusive ``flock`` on workdir/lock, taken before anything is written and
  released by the OS when the process ends however it ends (a SIGKILL included), so a second
  run on the same workdir stops at once naming the first (pid, host, start time).
- ``RunConfig``: the loop's and the checkpoints' keys.
- The keys that shape the training trajectory (data, batch, optimizer, loss, seed, model: those
  their groups mark ``resume``, ``config.resume_keys()``): a checkpoint's record keeps them and
  a fingerprint of the training tokens; ``check_resume`` refuses a resume where they differ,
  naming each key with its saved and new value, unless ``allow_resume_changes`` lists it. The
  other keys (logging, saving, mesh, max_steps to extend a run, ...) may change freely.
- ``write_run_files``: config.json and the tokenizer, written only after those checks pass, so a
  refused run leaves the workdir as it was.
- ``last_metrics``: the last train and eval lines of metrics.jsonl (a rerun of a finished run
  reports them), skipping a torn line.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpo_jax import keys as K, storage
from dpo_jax.checkpoint import CheckpointMismatch
from dpo_jax.errors import DpoError
from dpo_jax.reference import fingerprint

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """loop (dpo_jax/trainer.py) and checkpoints"""

    seed: int = K.key(0, "data order, random init and sampling",
                      K.integer(0, "a seed is a non-negative integer"), resume=True)
    logging_steps: int = K.key(10, "log train metrics every this many updates", K.integer(1))
    eval_steps: int = K.key(100, "evaluate every this many updates (and at the end); 0 = end "
                            "only", K.integer(0, "0 = at the end only"))
    save_steps: int = K.key(100, "checkpoint every this many updates (and at the end)",
                            K.integer(1))
    save_total_limit: int = K.key(3, "checkpoints kept",
                                  K.integer(1, "a run keeps at least its last checkpoint"))
    export_hf: bool = K.key(True, "at the end, write the policy as an HF folder to workdir/hf",
                            K.flag)
    progress_bar: bool = K.key(True, "tqdm bar on stderr", K.flag)
    allow_resume_changes: str = K.key("", "keys a resume may change (comma-separated, or "
                                      "\"all\")", K.text)

    def __post_init__(self):
        K.check_fields(self)


def open_workdir(path, process: int = 0, processes: int = 1):
    """(local folder, lock, mirror) of a run's workdir. Local: the folder itself, its ``Lock``,
    no mirror. An object store (``storage.path``): the bucket checked, its ``storage.Lease``,
    and a ``storage.Mirror`` whose staging folder holds the run files, pulled from the bucket."""
    where = storage.path(path)
    if not storage.is_remote(where):
        local = make(where)
        return local, Lock(local, process, processes), None
    storage.check_access(where)
    lease = storage.Lease(f"{where}/{'lock' if processes == 1 else f'lock.{process}'}")
    try:
        mirror = storage.Mirror(where)
        mirror.lease = lease
        return mirror.pull(), lease, mirror
    except BaseException:
        lease.release()
        raise


def make(path) -> Path:
    """The workdir, created if needed, with one clear error where it cannot be."""
    workdir = Path(path).expanduser().absolute()
    if workdir.exists() and not workdir.is_dir():
        raise DpoError(f"--workdir {workdir} is a file, not a folder")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpoError(f"--workdir {workdir} cannot be created: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise DpoError(f"--workdir {workdir} is not writable")
    return workdir


class Lock:
    """An exclusive lock on a workdir for the life of this process (one lock file per process
    of a multi-host run, so every process of a second run stops)."""

    def __init__(self, workdir: Path, process: int = 0, processes: int = 1):
        self.path = workdir / ("lock" if processes == 1 else f"lock.{process}")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot create the workdir's lock file {self.path}: "
                                   f"{e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise DpoError(f"{workdir} is in use by another run ({holder}); wait for it to end, "
                           "or use another --workdir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def run_settings(flat, resume_keys, train_data: str) -> dict:
    """The values of the keys a resume must keep (``resume_keys``, of the flat config as given),
    and the training tokens' fingerprint, as JSON stores them (tuples become lists)."""
    values = {k: flat[k] for k in resume_keys}
    return json.loads(json.dumps({**values, "train_data": train_data}))


def check_resume(record: dict, settings: dict, allow: str, where: Path):
    """Refuses a resume whose settings differ from the checkpoint's, unless allowed."""
    saved = record.get("run")
    if saved is None:
        log.warning("%s was written before runs recorded their settings; resuming without "
                    "checking them", where)
        return
    allowed = {k.strip() for k in allow.split(",") if k.strip()}
    # A key the record lacks was made a resume key after the checkpoint was written.
    diff = {k: (saved[k], v) for k, v in settings.items()
            if k in saved and saved[k] != v and "all" not in allowed and k not in allowed}
    if diff:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatch(
            f"{where} was trained with other settings than this run's ({shown}). Use a fresh "
            f"--workdir, restore the settings, or resume anyway with "
            f"--config.allow_resume_changes={','.join(diff)}")


def write_run_files(workdir: Path, config, tokenizer):
    """config.json and tokenizer/ of the run (after the resume checks have passed)."""
    tmp = workdir / "config.json.tmp"
    tmp.write_text(config.to_json_best_effort(indent=2) + "\n")
    os.replace(tmp, workdir / "config.json")
    tokenizer.save_pretrained(str(workdir / "tokenizer"))


def read_jsonl(path: Path) -> list[dict]:
    """The parsable lines of a JSONL file; a torn line (a crash or a full disk mid-write) is
    skipped with a warning."""
    rows = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s, line %d: not a complete JSON line (a write cut short?); skipped",
                        path, i)
    return rows


def last_metrics(path: Path) -> tuple[dict, dict]:
    """(the last train metrics, the last eval metrics) logged in metrics.jsonl, unprefixed."""
    train, evals = {}, {}
    if path.exists():
        for row in read_jsonl(path):
            t = {k[6:]: v for k, v in row.items() if k.startswith("train/")}
            e = {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
            train, evals = t or train, e or evals
    return train, evals


def data_fingerprint(pairs) -> str:
    """The training tokens' fingerprint, the same on every process (each hashes its share)."""
    local = fingerprint(pairs.prompt, pairs.chosen, pairs.rejected)
    if jax.process_count() == 1:
        return local
    every = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(local), np.uint8))
    return fingerprint(np.asarray(every).tobytes())
