"""``Run``: everything ``trainer.setup`` builds for one run; ``loop`` advances its ``state``,
``finish`` reports. The trainer owns it: modules below the trainer take what they need from it
and return values, never set its fields."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np

from dpo_jax import checkpoint, config as configs, data, layouts, tuning as tunings
from dpo_jax.errors import DpoError
from dpo_jax.interrupts import Interrupts
from dpo_jax.losses import LossConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything ``setup`` builds; ``loop`` advances ``state``, ``finish`` reports."""

    cfg: configs.Config         # the run's settings, one typed group per idea
    workdir: Path
    mesh: object
    lead: bool                  # the process that logs and exports
    tokenizer: object
    model_cfg: object
    tuning: tunings.Tuning
    layout: layouts.Layout
    loss_cfg: LossConfig
    train_pairs: data.TokenizedPairs
    eval_pairs: data.TokenizedPairs | None
    train_batches: data.PairBatches
    eval_batches: data.PairBatches | None
    total_steps: int
    state: dict
    frozen: dict                # the frozen params: full tuning's reference ({} once
    #                             precomputed, or when no loss needs it), or the adapters' base
    ckpt: checkpoint.Checkpointer
    start: int                  # the step resumed from (0 for a fresh run)
    rng: jax.Array
    settings: dict = dataclasses.field(default_factory=dict)  # its resume keys' values
    expect: dict = dataclasses.field(default_factory=dict)  # what its checkpoints must match
    interrupts: Interrupts | None = None
    train_step: object = None
    eval_step: object = None
    batch: dict | None = None   # the next update's micro-batches, drawn ahead
    last_train: dict = dataclasses.field(default_factory=dict)
    last_eval: dict = dataclasses.field(default_factory=dict)
    num_tokens: int = 0         # TRL's num_tokens: the tokens of every trained sequence so far
    last_samples: tuple = (0, None)  # (step, pi_ref / pi_theta completions) of the last eval
    samples_skipped: bool = False    # why samples cannot be drawn was logged

    @property
    def reference_params(self) -> dict:
        """The reference's params now (TR-DPO keeps them in the train state)."""
        return self.state["ref"] if "ref" in self.state else self.frozen

    @property
    def n_proc(self) -> int:
        return jax.process_count()

    def step_kw(self) -> dict:
        return dict(chunk_size=self.cfg.layout.logprob_chunk_size, pair_blocks=self.n_proc)

    def next_update(self) -> dict:
        accum = self.cfg.optim.gradient_accumulation_steps
        return data.stack_batches([next(self.train_batches) for _ in range(accum)])

    def record(self, cursor: dict) -> dict:
        return {"data": cursor, "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
                "step": int(self.state["step"]), "run": self.settings,
                "num_tokens": self.num_tokens, **self.expect}

    def last_checkpoint(self) -> str:
        """The newest complete checkpoint, in words (after any save in flight has finished)."""
        try:
            self.ckpt.wait()
        except DpoError as e:  # that save failed; say so, and name the one before it
            log.error("%s", e)
        step = self.ckpt.latest_step()
        return (f"step {step} in {self.ckpt.directory}" if step is not None
                else f"none yet (no checkpoint was saved in {self.ckpt.directory})")
