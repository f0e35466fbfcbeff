"""Where a run's numbers go: ``metrics.jsonl`` in the workdir, TensorBoard, and train.log."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    """workdir/metrics.jsonl (one line per logged step) and TensorBoard event files.

    On resume, lines of steps after the checkpoint being resumed are dropped, so every step is
    logged once; a torn line (a crash or a full disk mid-write) is dropped with a warning. A
    write that fails names the file.
    """

    def __init__(self, workdir: Path, resume_step: int | None):
        from dpo_jax.workdir import read_jsonl
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():
            keep = [row for row in read_jsonl(self.path)
                    if resume_step is not None and row.get("step", 1 << 62) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(k) + "\n" for k in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, scalars: dict):
        try:
            self.file.write(json.dumps({"step": step, **scalars}) + "\n")
            self.file.flush()
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror}: writing {self.path}") from None
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def file_logging(workdir: Path) -> logging.Handler:
    """Adds workdir/train.log to the package's logger; the caller removes it when done."""
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dpo_jax").addHandler(handler)
    logging.getLogger("dpo_jax").setLevel(logging.INFO)
    return handler


def fmt(m: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items())


def print_summary(s: dict):
    """The end-of-run report on stdout."""
    loss = s["train/loss"]
    lines = [f"done: {s['steps']} steps; final train loss "
             f"{'(not logged)' if loss is None else f'{loss:.4f}'}"]
    if s["eval/rewards/accuracies"] is not None:
        lines.append(f"eval: loss {s['eval/loss']:.4f}, reward accuracy "
                     f"{s['eval/rewards/accuracies']:.3f}, reward margin "
                     f"{s['eval/rewards/margins']:.4f}")
    lines.append(f"checkpoint: {s['checkpoint']}")
    if s["hf_export"]:
        lines.append(f"HF export: {s['hf_export']}")
    for sample in s.get("samples", []):
        lines.append(f"prompt:   {sample['prompt']!r}\n  pi_ref:   {sample['pi_ref']!r}\n"
                     f"  pi_theta: {sample['pi_theta']!r}")
    print("\n".join(lines), flush=True)
