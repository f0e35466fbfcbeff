"""Where a run's numbers go: ``metrics.jsonl`` and ``samples.jsonl`` in the workdir, always; the
trackers of config key ``report_to`` (TensorBoard event files in workdir/tensorboard, wandb
through its own library, offline with ``WANDB_MODE=offline``); and train.log."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import sys
from pathlib import Path

from dpo_jax import keys as K
from dpo_jax.errors import ConfigError
from dpo_jax.workdir import read_jsonl

log = logging.getLogger(__name__)


TRACKERS = ("tensorboard", "wandb")


def _report_to(name, v):
    K.text(name, v)
    names = [t.strip() for t in v.split(",") if t.strip()]
    bad = [t for t in names if t not in TRACKERS + ("none",)]
    if bad or not names or ("none" in names and len(names) > 1):
        raise ConfigError(f"config key {name}={v!r}: a comma-separated list of "
                          f"{', '.join(TRACKERS)}, or 'none'")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """trackers (dpo_jax/tracking.py)"""

    report_to: str = K.key("tensorboard", "trackers: tensorboard, wandb (pip install wandb), "
                           "both (\"tensorboard,wandb\") or none; metrics.jsonl is always written",
                           _report_to)
    wandb_project: str = K.key("dpo_jax", "wandb's project; its run is named after the workdir",
                               K.nonempty)
    peak_tflops: float = K.key(0.0, "a device's peak TFLOP/s for train/mfu; 0 = the dense bf16 "
                               "figure of known GPUs and TPUs (none for a CPU: no MFU logged)",
                               K.number(0.0))

    def __post_init__(self):
        K.check_fields(self)


def _keep_until(path: Path, resume_step: int | None):
    """Drops the lines of steps after ``resume_step`` (all of them for a fresh run)."""
    if path.exists():
        keep = [row for row in read_jsonl(path)
                if resume_step is not None and row.get("step", 1 << 62) <= resume_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(k) + "\n" for k in keep))
        os.replace(tmp, path)


class MetricsLog:
    """workdir/metrics.jsonl (one line per logged step), workdir/samples.jsonl (one line per
    eval step: pi_ref and pi_theta completions) and the trackers of ``report_to``.

    On resume, lines of steps after the checkpoint being resumed are dropped, so every step is
    logged once; a torn line (a crash or a full disk mid-write) is dropped with a warning. A
    write that fails names the file. wandb resumes the same run (its id is kept in the workdir).
    """

    def __init__(self, workdir: Path, resume_step: int | None,
                 cfg: TrackingConfig = TrackingConfig(), flat=None):
        """``cfg``: the trackers; ``flat``: the run's config as given (wandb records it)."""
        self.path, self.samples_path = workdir / "metrics.jsonl", workdir / "samples.jsonl"
        for path in (self.path, self.samples_path):
            _keep_until(path, resume_step)
        self.file = open(self.path, "a")
        trackers = {t.strip() for t in cfg.report_to.split(",")} - {"none", ""}
        self.tb = self.wandb = None
        if "tensorboard" in trackers:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                log.warning("report_to names tensorboard, but tensorboardX is not installed: "
                            "metrics.jsonl only")
        if "wandb" in trackers:
            self.wandb = _wandb_run(workdir, cfg.wandb_project, flat)

    def write(self, step: int, scalars: dict):
        try:
            self.file.write(json.dumps({"step": step, **scalars}) + "\n")
            self.file.flush()
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror}: writing {self.path}") from None
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def write_samples(self, step: int, samples: list[dict]):
        """One eval step's completions: a line of samples.jsonl, a TensorBoard text, a wandb
        table."""
        try:
            with open(self.samples_path, "a") as f:
                f.write(json.dumps({"step": step, "samples": samples}) + "\n")
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror}: writing {self.samples_path}") from None
        if self.tb is not None:
            rows = "\n".join(f"| {s['prompt']!r} | {s['pi_ref']!r} | {s['pi_theta']!r} |"
                             for s in samples)
            self.tb.add_text("samples", "| prompt | pi_ref | pi_theta |\n|---|---|---|\n" + rows,
                             step)
        if self.wandb is not None:
            import wandb
            table = wandb.Table(columns=["step", "prompt", "pi_ref", "pi_theta"],
                                data=[[step, s["prompt"], s["pi_ref"], s["pi_theta"]]
                                      for s in samples])
            self.wandb.log({"samples": table}, step=step)

    def flush(self):
        """Everything written so far is in the files (before a remote workdir's push)."""
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(workdir: Path, project: str, flat):
    """A wandb run for this workdir: named after it, the run's config logged, resumed under the
    same id on a rerun (kept in workdir/wandb_id)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("config key report_to names wandb, but wandb is not installed "
                          "(pip install wandb, or pip install 'dpo_jax[wandb]')") from None
    id_file = workdir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=workdir.resolve().name, id=run_id, resume="allow",
                      dir=str(workdir), config=flat.to_dict() if flat is not None else None)


def console_logging():
    """The CLIs' logging: the package's INFO lines on stderr; the libraries' only from WARNING
    up (orbax and absl log every checkpoint step, JAX its backend probes)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "datasets", "transformers", "httpx", "gcsfs",
                  "fsspec", "google"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    g = s.get("goodput")
    if g:
        mfu = f"; MFU {100 * g['mfu']:.1f}%" if g.get("mfu") is not None else ""
        lines.append(f"goodput: {100 * g['step_share']:.0f}% of {g['wall_s']:.0f} s in train "
                     f"steps (compile {g['compile_s']:.0f} s, eval {g['eval_s']:.0f} s, "
                     f"checkpoints {g['checkpoint_s']:.0f} s, data {g['data_s']:.0f} s){mfu}")
    lines.append(f"checkpoint: {s['checkpoint']}")
    if s["hf_export"]:
        lines.append(f"HF export: {s['hf_export']}")
    for sample in s.get("samples", []):
        lines.append(f"prompt:   {sample['prompt']!r}\n  pi_ref:   {sample['pi_ref']!r}\n"
                     f"  pi_theta: {sample['pi_theta']!r}")
    print("\n".join(lines), flush=True)
