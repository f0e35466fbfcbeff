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
    logged once.
    """

    def __init__(self, workdir: Path, resume_step: int | None):
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and resume_step is not None
                    and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, scalars: dict):
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
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
