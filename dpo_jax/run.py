"""``Run``: everything ``trainer.setup`` builds for one run; ``loop`` advances its ``state``,
``finish`` reports. The trainer owns it: modules below the trainer take what they need from it
and return values, never set its fields."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpo_jax import checkpoint, config as configs, data, goodput, layouts, logprobs
from dpo_jax import tuning as tunings
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
    layout: layouts.Layout      # the train step's (plan.Plan decided it)
    eval_layout: layouts.Layout  # the eval step's
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
    mirror: object = None       # a remote workdir's storage.Mirror (None: a local workdir)
    clock: goodput.Clock = dataclasses.field(default_factory=goodput.Clock)

    @property
    def reference_params(self) -> dict:
        """The reference's params now (TR-DPO keeps them in the train state)."""
        return self.state["ref"] if "ref" in self.state else self.frozen

    @property
    def n_proc(self) -> int:
        return jax.process_count()

    def step_kw(self) -> dict:
        return dict(chunk_size=self.chunk_size, pair_blocks=self.n_proc)

    @property
    def chunk_size(self) -> int:
        """Positions per LM-head chunk (config key logprob_chunk_size, -1 resolved)."""
        return logprobs.chunk_positions(self.cfg.layout.logprob_chunk_size,
                                        self.model_cfg.vocab_size)

    def next_update(self) -> dict:
        accum = self.cfg.optim.gradient_accumulation_steps
        return data.stack_batches([next(self.train_batches) for _ in range(accum)])

    def record(self, cursor: dict) -> dict:
        return {"data": cursor, "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
                "step": int(self.state["step"]), "run": self.settings,
                "num_tokens": self.num_tokens, **self.expect}

    def step_flops(self) -> float:
        """Model FLOPs of one update (``goodput.step_flops``) at the batch shapes planned."""
        batch = self.batch if self.batch is not None else {}
        if "input_ids" not in batch:
            return 0.0
        reference = self.loss_cfg.needs_reference and "ref_chosen_logps" not in batch
        return goodput.step_flops(self.model_cfg, batch,
                                  adapters=not self.tuning.trains_base_weights,
                                  reference=reference, processes=self.n_proc)

    def stop_requested(self, at_sync_point: bool) -> bool:
        """Whether a SIGTERM asks to save this step and stop. With several processes the
        decision is collective (a save is, and a host that saved alone would wait forever for
        the others): every process's flag is gathered at the loop's sync points (logging, eval
        and save steps), so all save the same step and stop together."""
        if self.interrupts is None:
            return False
        if self.n_proc == 1:
            return self.interrupts.terminate
        if not at_sync_point:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.interrupts.terminate))
        return bool(np.asarray(flags).any())

    def push(self, *, every: float = 0.0, strict: bool = False):
        """A remote workdir: the run files that changed, to the bucket (the lead process's)."""
        if self.mirror is not None and self.lead:
            self.mirror.push(every=every, strict=strict)

    def where(self, local) -> str:
        """A file of the workdir as the user named it (the bucket's URL for a staged file)."""
        if self.mirror is None:
            return str(local)
        rel = Path(local).relative_to(self.workdir).as_posix()
        return str(self.mirror.remote) + ("" if rel == "." else f"/{rel}")

    def last_checkpoint(self) -> str:
        """The newest complete checkpoint, in words (after any save in flight has finished)."""
        try:
            self.ckpt.wait()
        except DpoError as e:  # that save failed; say so, and name the one before it
            log.error("%s", e)
        step = self.ckpt.latest_step()
        return (f"step {step} in {self.ckpt.directory}" if step is not None
                else f"none yet (no checkpoint was saved in {self.ckpt.directory})")

    def describe(self) -> list[str]:
        """What this run trains, on what, how: the lines a run logs once at its start."""
        cfg, n = self.cfg, lambda tree: sum(int(a.size) for a in jax.tree.leaves(tree))
        policy = n(self.state["params"])
        frozen = n(self.frozen) if self.frozen else 0
        total = policy if self.tuning.name == "full" else frozen
        source = cfg.model.model_name_or_path or "random init (config key model)"
        devices = jax.devices()
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        opt, lay, loss = cfg.optim, cfg.layout, cfg.loss
        pairs = opt.train_batch_size * opt.gradient_accumulation_steps
        per_epoch = self.train_batches.steps_per_epoch // opt.gradient_accumulation_steps
        reference = ("TR-DPO: mixed toward the policy every "
                     f"{cfg.reference.ref_model_sync_steps} updates"
                     if cfg.reference.sync_ref_model else
                     "precomputed log-probs" if cfg.reference.precompute_ref_log_probs else
                     "none (the loss needs none)" if not loss.needs_reference else
                     f"from {cfg.reference.ref_model_name_or_path}"
                     if cfg.reference.ref_model_name_or_path else
                     "its own frozen copy" if self.tuning.name == "full" else
                     "the base with the adapters off")
        weights = loss.loss_weights or (1.0,) * len(loss.loss_type)
        return [
            f"model: {self.model_cfg.__class__.__name__} ({self.tuning.name} tuning), "
            f"{total / 1e6:.2f}M parameters, {policy / 1e6:.3f}M trainable, from {source}; "
            f"compute {cfg.model.dtype}, remat {cfg.model.remat}",
            f"devices: {len(devices)} x {devices[0].platform}, {jax.process_count()} "
            f"process(es); mesh {mesh}",
            f"layout: {self.layout.name}, packing {lay.packing}, attention "
            f"{self.model_cfg.attention}, MLP " + (f"in tiles of {self.model_cfg.mlp_tile} "
                                                   "positions" if self.model_cfg.mlp_tile
                                                   else "over whole rows")
            + f", LM-head chunks of {self.chunk_size} positions",
            f"batches: {opt.train_batch_size} pairs per micro-batch x "
            f"{opt.gradient_accumulation_steps} accumulated = {pairs} pairs per update (all "
            f"devices); {self.total_steps} updates = {self.total_steps / max(per_epoch, 1):.2f} "
            f"epochs of {per_epoch} updates",
            f"optimizer: {opt.optim}, learning rate {opt.learning_rate:g}, "
            f"{opt.lr_scheduler_type} after {opt.warmup_steps} warmup updates, weight decay "
            f"{opt.weight_decay:g}, clip {opt.max_grad_norm:g}",
            f"loss: {' + '.join(f'{w:g} x {t}' for w, t in zip(weights, loss.loss_type))}, "
            f"beta {loss.beta:g}" + (f", rpo_alpha {loss.rpo_alpha:g}" if loss.rpo_alpha else "")
            + (f", ld_alpha {loss.ld_alpha:g}" if loss.ld_alpha != 1 else "")
            + (", WPO weighting" if loss.use_weighting else "") + f"; reference: {reference}",
        ]
