"""The workdir of a run: one run at a time, its settings kept, a resume checked against them.

- ``Lock``: an exclusive ``flock`` on workdir/lock, taken before anything is written and
  released by the OS when the process ends however it ends (a SIGKILL included), so a second
  run on the same workdir stops at once naming the first (pid, host, start time).
- ``RUN_KEYS``: the config keys that shape the training trajectory (data, batch, optimizer,
  loss, seed, model). A checkpoint's record keeps them and a fingerprint of the training
  tokens; ``check_resume`` refuses a resume where they differ, naming each key with its saved
  and new value, unless ``allow_resume_changes`` lists it. Keys outside RUN_KEYS (logging,
  saving, mesh, max_steps to extend a run, ...) may change freely.
- ``write_run_files``: config.json and the tokenizer, written only after those checks pass, so a
  refused run leaves the workdir as it was.
- ``last_metrics``: the last train and eval lines of metrics.jsonl (a rerun of a finished run
  reports them), skipping a torn line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np

from dpo_jax.checkpoint import CheckpointMismatch
from dpo_jax.errors import DpoError
from dpo_jax.reference import fingerprint

log = logging.getLogger(__name__)

RUN_KEYS = (
    # model and tokens
    "model_name_or_path", "tokenizer_name_or_path", "dtype", "ref_dtype",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora",
    # data
    "dataset_name", "dataset_train_split", "prompt_column", "chosen_column", "rejected_column",
    "tokenization", "max_length", "max_prompt_length", "max_completion_length", "add_bos",
    "on_bad_row", "length_buckets",
    # batches and optimizer
    "train_batch_size", "gradient_accumulation_steps", "packing", "pack_rows", "optim",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "min_lr_ratio", "weight_decay",
    "decay_biases_and_norms", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm",
    # loss
    "loss_type", "loss_weights", "beta", "label_smoothing", "reference_free", "rpo_alpha",
    "simpo_gamma", "discopop_tau", "ld_alpha", "use_weighting", "f_divergence_type",
    "f_alpha_divergence_coef", "token_metrics", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    # order
    "seed",
    # the training tokens themselves (a fingerprint): a data file edited in place
    "train_data",
)


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


def run_settings(config, train_data: str) -> dict:
    """The RUN_KEYS of a config as JSON stores them (tuples become lists)."""
    values = {k: config[k] for k in RUN_KEYS if k != "train_data"}
    return json.loads(json.dumps({**values, "train_data": train_data}))


def check_resume(record: dict, settings: dict, allow: str, where: Path):
    """Refuses a resume whose RUN_KEYS differ from the checkpoint's, unless allowed."""
    saved = record.get("run")
    if saved is None:
        log.warning("%s was written before runs recorded their settings; resuming without "
                    "checking them", where)
        return
    allowed = {k.strip() for k in allow.split(",") if k.strip()}
    # A key the record lacks was added to RUN_KEYS after the checkpoint was written.
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
    from jax.experimental import multihost_utils
    every = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(local), np.uint8))
    return fingerprint(np.asarray(every).tobytes())
