"""``train_and_evaluate(config, workdir)``: setup -> loop -> finish; never loses work.

- ``setup`` builds everything exactly as a fresh run would (model, data, optimizer, steps), then
  restores the latest complete checkpoint over it (params, optimizer state, step, data cursor,
  rng). That order is what makes a resumed run see exactly the batches an uninterrupted one
  would.
- ``loop`` runs the updates. It does not wait for the device at every step: metrics come back
  on logging, eval and save steps, and a non-finite step is caught there by the state's flag
  (``steps.py``), with the step at which it happened.
- ``finish`` exports the policy to workdir/hf, writes the summary and compares pi_ref and
  pi_theta on a few prompts, with the reference already in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import (checkpoint, data, evaluation, hf, hub, layouts, lora, models, optim,
                     reference, sharding, steps, tracking, tuning, validate,
                     workdir as workdirs)
from dpo_jax.errors import ConfigError, DpoError, NonFiniteError, Stopped
from dpo_jax.interrupts import Interrupts
from dpo_jax.losses import LossConfig

log = logging.getLogger(__name__)


# =========================================================================== setup

def scoring_window(config) -> int:
    """The static completion window of the completion-only head (0 = head on every position)."""
    if config.layout == "prefix_sharing" or config.completion_only_head:
        return config.max_completion_length
    return 0


@dataclasses.dataclass
class Run:
    """Everything ``setup`` builds; ``loop`` advances ``state``, ``finish`` reports."""

    config: object
    workdir: Path
    mesh: object
    lead: bool                  # the process that logs and exports
    tokenizer: object
    model_cfg: object
    tuning: tuning.FullTuning | lora.LoRATuning
    layout: layouts.Layout
    loss_cfg: LossConfig
    train_pairs: data.TokenizedPairs
    eval_pairs: data.TokenizedPairs | None
    train_batches: data.PairBatches
    eval_batches: data.PairBatches | None
    total_steps: int
    state: dict
    frozen: dict                # the reference (full tuning; {} once precomputed), or LoRA's base
    ckpt: checkpoint.Checkpointer
    start: int                  # the step resumed from (0 for a fresh run)
    rng: jax.Array
    settings: dict = dataclasses.field(default_factory=dict)  # workdir.RUN_KEYS of this run
    expect: dict = dataclasses.field(default_factory=dict)  # what its checkpoints must match
    interrupts: Interrupts | None = None
    train_step: object = None
    eval_step: object = None
    batch: dict | None = None   # the next update's micro-batches, drawn ahead
    last_train: dict = dataclasses.field(default_factory=dict)
    last_eval: dict = dataclasses.field(default_factory=dict)

    @property
    def n_proc(self) -> int:
        return jax.process_count()

    def step_kw(self) -> dict:
        return dict(chunk_size=self.config.logprob_chunk_size, pair_blocks=self.n_proc)

    def next_update(self) -> dict:
        accum = self.config.gradient_accumulation_steps
        return data.stack_batches([next(self.train_batches) for _ in range(accum)])

    def record(self, cursor: dict) -> dict:
        return {"data": cursor, "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
                "step": int(self.state["step"]), "run": self.settings, **self.expect}

    def last_checkpoint(self) -> str:
        """The newest complete checkpoint, in words (after any save in flight has finished)."""
        try:
            self.ckpt.wait()
        except DpoError as e:  # that save failed; say so, and name the one before it
            log.error("%s", e)
        step = self.ckpt.latest_step()
        return (f"step {step} in {self.ckpt.directory}" if step is not None
                else f"none yet (no checkpoint was saved in {self.ckpt.directory})")


def setup(config, workdir: Path, interrupts: Interrupts | None = None) -> Run:
    """Builds the run (config already checked, JAX's processes already joined). With
    ``interrupts``, a SIGTERM or Ctrl-C stops it between phases."""

    def phase_done():
        if interrupts is not None:
            interrupts.check_interrupt()
            if interrupts.terminate:
                raise Stopped("stopped by SIGTERM during setup (nothing trained, nothing lost); "
                              "rerun the same command to start again", 143)

    loss_cfg = LossConfig.from_config(config)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    n_proc, proc = jax.process_count(), jax.process_index()
    lead = proc == 0
    if n_proc > 1 and config.length_buckets:
        raise ConfigError("config key length_buckets needs one process: hosts would pick "
                          "different shapes for the same step")
    for key in ("train_batch_size", "eval_batch_size"):
        if config[key] % n_proc:
            raise ConfigError(f"config key {key}={config[key]} does not divide over {n_proc} "
                              "processes")

    tokenizer = hub.load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path)
    model_cfg, params = hf.initial_model(config, tokenizer, mesh)
    phase_done()
    family = models.family_of(model_cfg)
    for field, limit in model_cfg.length_limits().items():
        if config.max_length > limit:
            raise ConfigError(f"config key max_length={config.max_length} exceeds the model's "
                              f"{field}={limit}")
    for key in ("train_batch_size", "eval_batch_size"):
        sharding.check_model_fits(mesh, model_cfg, config[key])
    layout = layouts.make(config.layout, scoring_window(config))

    train_pairs, eval_pairs = data.load_splits(config, tokenizer, shard=(proc, n_proc))
    phase_done()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_kw = dict(max_length=config.max_length, pad_id=pad_id, buckets=config.length_buckets,
                    layout=layout)
    train_batches = data.PairBatches(train_pairs, batch_size=config.train_batch_size // n_proc,
                                     seed=config.seed, source=config.dataset_name,
                                     batch_key="train_batch_size", **batch_kw)
    eval_batches = (data.PairBatches(eval_pairs, batch_size=config.eval_batch_size // n_proc,
                                     shuffle=False, source=config.eval_dataset_name or
                                     config.dataset_name, batch_key="eval_batch_size", **batch_kw)
                    if eval_pairs else None)
    log.info("train data: %s; padding %.1f%%", data.summary_line(train_pairs.stats),
             100 * train_batches.padding_fraction())

    accum = config.gradient_accumulation_steps
    micro_per_epoch = train_batches.steps_per_epoch
    if n_proc > 1:  # every process must run the same number of steps
        from jax.experimental import multihost_utils
        micro_per_epoch = int(multihost_utils.process_allgather(np.int32(micro_per_epoch)).min())
    updates_per_epoch = micro_per_epoch // accum
    if updates_per_epoch == 0:
        raise ConfigError(f"{config.dataset_name}: {micro_per_epoch} micro-batches of "
                          f"train_batch_size={config.train_batch_size} per epoch make no update of "
                          f"gradient_accumulation_steps={accum} (lower one of these config keys)")
    total_steps = config.max_steps if config.max_steps > 0 else \
        config.num_train_epochs * updates_per_epoch
    parts = tuning.split(config, mesh, family, model_cfg, params)
    del params
    optimizer, lr_schedule = optim.build(config, total_steps, parts.decay_mask)
    state, state_sh = sharding.init_state(mesh, parts.trainable, optimizer, parts.rules)
    frozen = parts.frozen if parts.frozen is not None else (
        tuning.reference_copy(state, state_sh, config.ref_dtype) if loss_cfg.needs_reference
        else {})
    expect = {"model_config": checkpoint.model_config_record(model_cfg),
              "lora": parts.lora_record}

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.save_total_limit)
    run = Run(config=config, workdir=workdir, mesh=mesh, lead=lead, tokenizer=tokenizer,
              model_cfg=model_cfg, tuning=parts.tuning, layout=layout, loss_cfg=loss_cfg,
              train_pairs=train_pairs, eval_pairs=eval_pairs, train_batches=train_batches,
              eval_batches=eval_batches, total_steps=total_steps, state=state, frozen=frozen,
              ckpt=ckpt, start=0, rng=jax.random.key(config.seed), expect=expect,
              settings=workdirs.run_settings(config, workdirs.data_fingerprint(train_pairs)))
    _resume(run)
    phase_done()
    run.interrupts = interrupts
    if lead:  # only now that the resume checks passed
        workdirs.write_run_files(workdir, config, tokenizer)
    if config.precompute_ref_log_probs and loss_cfg.needs_reference:
        reference.precompute_for_run(run)
    _compile(run, optimizer, lr_schedule, state_sh)
    return run


def _resume(run: Run):
    """Restores the newest intact checkpoint over the freshly built run, after checking that it
    was written by a run of the same model and settings."""
    found = run.ckpt.restore_latest_good(checkpoint.abstract_like(run.state), expect=run.expect)
    if found is None:
        return
    start, state, record = found
    workdirs.check_resume(record, run.settings, run.config.allow_resume_changes,
                          run.ckpt.directory / str(start))
    if start > run.total_steps:
        raise ConfigError(f"{run.ckpt.directory / str(start)} is past this run's "
                          f"{run.total_steps} steps (config keys max_steps / num_train_epochs): "
                          "raise max_steps to continue it, or use a fresh --workdir")
    run.state = state
    run.train_batches.restore(record["data"])
    run.rng = jax.random.wrap_key_data(jnp.asarray(record["rng"], jnp.uint32))
    run.start = start
    log.info("resumed from %s at step %d", run.ckpt.directory / str(start), start)


def _compile(run: Run, optimizer, lr_schedule, state_sh):
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    frozen_sh = jax.tree.map(lambda a: a.sharding, run.frozen)
    if run.start < run.total_steps:
        run.batch = run.next_update()
        batch_sh = {k: sharding.batch_sharding(run.mesh, v.ndim) for k, v in run.batch.items()}
        run.train_step = steps.make_train_step(
            run.tuning, run.layout, run.loss_cfg, optimizer, lr_schedule, **run.step_kw(),
            in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated),
            seed=run.config.seed)
    run.eval_step = steps.make_eval_step(run.tuning, run.layout, run.loss_cfg,
                                         out_shardings=replicated, **run.step_kw())


# =========================================================================== loop

def loop(run: Run, metrics_log: tracking.MetricsLog | None):
    config, n_proc = run.config, run.n_proc
    progress = None
    if config.progress_bar and run.lead:
        from tqdm import tqdm
        progress = tqdm(total=run.total_steps, initial=run.start, desc="train", unit="step",
                        dynamic_ncols=True)
    t_last, s_last, tokens = time.perf_counter(), run.start, 0
    for s in range(run.start + 1, run.total_steps + 1):
        tokens += int(run.batch["attention_mask"].sum()) * n_proc
        run.state, m = run.train_step(run.state, run.frozen,
                                      sharding.shard_batch(run.mesh, run.batch))
        # The cursor a checkpoint of step s must hold: where step s + 1's batch starts, so it is
        # taken before that batch is drawn (drawing it now overlaps host work with the device).
        cursor = run.train_batches.state()
        run.batch = run.next_update() if s < run.total_steps else None
        last = s == run.total_steps
        if run.interrupts is not None:
            run.interrupts.check_interrupt()
        stop = run.interrupts is not None and run.interrupts.terminate
        log_now = s % config.logging_steps == 0 or last
        eval_now = run.eval_batches is not None and (
            (config.eval_steps and s % config.eval_steps == 0) or last)
        save_now = s % config.save_steps == 0 or last or stop
        if progress is not None:
            progress.update(1)
        if not (log_now or eval_now or save_now):
            continue  # the device runs on; nothing here needs its results yet
        bad = int(run.state["bad_step"])  # waits for step s
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if bad:
            raise NonFiniteError(f"non-finite loss or gradient at step {bad} (loss={m['loss']}, "
                                 f"grad_norm={m['grad_norm']}); the last good checkpoint is "
                                 f"{run.last_checkpoint()}")
        now = time.perf_counter()
        m["step_time"] = (now - t_last) / (s - s_last)
        m["tokens_per_sec"] = tokens / (now - t_last)
        t_last, s_last, tokens = now, s, 0
        run.last_train = m
        scalars = {f"train/{k}": v for k, v in m.items()} if log_now else {}
        if eval_now:
            run.last_eval = evaluation.evaluate(run.eval_step, run.state["params"], run.frozen,
                                                run.eval_batches, run.mesh)
            scalars.update({f"eval/{k}": v for k, v in run.last_eval.items()})
            log.info("step %d eval: %s", s, tracking.fmt(run.last_eval))
        if scalars and metrics_log is not None:
            metrics_log.write(s, scalars)
        if progress is not None:
            progress.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}",
                                 refresh=False)
        if save_now:
            run.ckpt.save(s, run.state, run.record(cursor))
        if stop:
            raise Stopped(f"stopped by SIGTERM at step {s}; the last complete checkpoint is "
                          f"{run.last_checkpoint()}; rerun the same command to resume", 143)
        t_last = time.perf_counter()  # eval and save are not step time
    if progress is not None:
        progress.close()


# =========================================================================== finish

def finish(run: Run) -> dict:
    """Exports, summarizes and compares samples. A rerun of a finished run reports it, redoing
    only what a kill cut short (summary.json is written last)."""
    config = run.config
    summary_path = run.workdir / "summary.json"
    if run.start == run.total_steps and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if run.lead:
            print(f"{run.workdir} holds a finished run of {run.total_steps} steps", flush=True)
            tracking.print_summary(summary)
        return summary
    if run.start == run.total_steps:  # finished, but a kill cut the export or summary short
        run.last_train, run.last_eval = workdirs.last_metrics(run.workdir / "metrics.jsonl")
    host_params = sharding.to_host(run.state["params"])
    if isinstance(run.tuning, lora.LoRATuning):  # the export is the base with adapters merged
        adapters, host_params = host_params, run.tuning.merged_params(
            host_params, sharding.to_host(run.frozen))
    if not checkpoint.all_finite(host_params):
        raise NonFiniteError(f"the params at step {run.total_steps} are not finite: nothing is "
                             f"exported; the last complete checkpoint is {run.last_checkpoint()}")
    hf_dir = None
    if config.export_hf and run.lead:
        hf_dir = hf.save_params(run.model_cfg, host_params, run.workdir / "hf")
        run.tokenizer.save_pretrained(str(hf_dir))
        if isinstance(run.tuning, lora.LoRATuning):  # and the adapter alone, as PEFT saves it
            lora.save_peft(run.workdir / "adapter", run.tuning, adapters,
                           config.model_name_or_path)
    summary = {
        "steps": run.total_steps,
        "train/loss": run.last_train.get("loss"),
        "eval/loss": run.last_eval.get("loss"),
        "eval/rewards/accuracies": run.last_eval.get("rewards/accuracies"),
        "eval/rewards/margins": run.last_eval.get("rewards/margins"),
        "checkpoint": str(run.ckpt.directory / str(run.total_steps)),
        "hf_export": str(hf_dir) if hf_dir else None,
    }
    if config.sample_prompts and run.n_proc == 1:
        if run.frozen:  # the reference in memory (see steps.FullTuning)
            pairs = run.eval_pairs if run.eval_pairs is not None else run.train_pairs
            prompts = [run.tokenizer.decode(p) for p in pairs.prompt[:config.sample_prompts]]
            summary["samples"] = evaluation.compare_samples(
                run.tuning.reference(run.state["params"], run.frozen),
                run.tuning.model(run.state["params"], run.frozen), run.tokenizer, prompts,
                max_new_tokens=config.sample_max_new_tokens)
        else:
            log.info("end-of-run samples skipped: the reference is not in memory (its log-probs "
                     "were precomputed, or the loss needs none); python generate.py --workdir "
                     "%s compares pi_ref and pi_theta", run.workdir)
    if run.lead:
        tracking.print_summary(summary)
        tmp = summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(summary_path)
    return summary


# =========================================================================== entry point

def train_and_evaluate(config, workdir) -> dict:
    """Trains, evaluates, checkpoints and exports; returns the final summary.

    Whatever stops a run, the save in flight is finished first: SIGTERM saves the current step
    and stops (``Stopped``, exit code 143); Ctrl-C stops (130); an error names the last
    complete checkpoint. A rerun of the same command resumes from it.
    """
    validate.check_config(config)
    if config.distributed:  # multi-host: before any other JAX call touches the devices
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address or None,
            num_processes=config.num_processes or None,
            process_id=config.process_id if config.process_id >= 0 else None)
    validate.check_backend(config)
    workdir = workdirs.make(workdir)
    lock = workdirs.Lock(workdir, jax.process_index(), jax.process_count())
    handler, interrupts, run = tracking.file_logging(workdir), Interrupts(), None
    try:
        run = setup(config, workdir, interrupts)
        if run.start < run.total_steps:
            metrics_log = tracking.MetricsLog(workdir, run.start) if run.lead else None
            try:
                loop(run, metrics_log)
            finally:
                if metrics_log is not None:
                    metrics_log.close()
        run.ckpt.close()
        return finish(run)
    except KeyboardInterrupt:
        where = run.last_checkpoint() if run is not None else "none (stopped during setup)"
        raise Stopped(f"interrupted (Ctrl-C); the last complete checkpoint is {where}; rerun "
                      "the same command to resume", 130) from None
    except DpoError:
        raise
    except Exception as e:  # a bug or an OS error: keep its traceback, say what is safe
        if run is not None:
            log.error("the run stopped (%s: %s); the last complete checkpoint is %s",
                      type(e).__name__, e, run.last_checkpoint())
        raise
    finally:
        if run is not None:
            try:
                run.ckpt.close()  # a save in flight completes (or, killed, is never picked up)
            except DpoError as e:
                log.error("%s", e)
        interrupts.restore()
        logging.getLogger("dpo_jax").removeHandler(handler)
        handler.close()
        lock.release()
