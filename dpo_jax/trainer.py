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
from tqdm import tqdm

from dpo_jax import (checkpoint, config as configs, data, evaluation, goodput, hf, hub, models,
                     optim, plan, reference, sharding, steps, storage, tracking,
                     tuning as tunings, workdir as workdirs)
from dpo_jax.errors import ConfigError, DpoError, NonFiniteError, Stopped
from dpo_jax.interrupts import Interrupts
from dpo_jax.run import Run

log = logging.getLogger(__name__)


# =========================================================================== setup

def setup(config, workdir: Path, interrupts: Interrupts | None = None,
          mirror: storage.Mirror | None = None) -> Run:
    """Builds the run (JAX's processes already joined) from its config: a ``configs.Config``,
    or the flat keys (checked here). With ``interrupts``, a SIGTERM or Ctrl-C stops it between
    phases. With ``mirror``, the workdir is remote: ``workdir`` is its local staging folder
    (``storage.Mirror``) and checkpoints go to the remote one."""

    def phase_done():
        if interrupts is not None:
            interrupts.check_interrupt()
            if interrupts.terminate:
                raise Stopped("stopped by SIGTERM during setup (nothing trained, nothing lost); "
                              "rerun the same command to start again", 143)

    cfg = config if isinstance(config, configs.Config) else configs.build(config)
    mesh = sharding.make_mesh(cfg.mesh.mesh_data, cfg.mesh.mesh_fsdp, cfg.mesh.mesh_tensor,
                              expert=cfg.mesh.mesh_expert, context=cfg.mesh.mesh_context)
    n_proc, proc = jax.process_count(), jax.process_index()
    _check_processes(cfg, n_proc)
    sharding.check_positions_within_processes(mesh)
    tokenizer = hub.load_tokenizer(cfg.model.tokenizer_name_or_path
                                   or cfg.model.model_name_or_path)
    # QLoRA on an FP8 base: an FP8 checkpoint's own codes and scales, never a float32 copy
    keep_fp8 = bool(cfg.tuning.lora_rank) and cfg.tuning.quantize_base == "fp8"
    model_cfg, params = hf.initial_model(cfg.model, tokenizer, mesh, seed=cfg.run.seed,
                                         keep_fp8=keep_fp8)
    phase_done()
    family = models.family_of(model_cfg)
    _check_model(cfg, model_cfg, mesh)
    layout = plan.layout(cfg)
    model_cfg = plan.compute(cfg, model_cfg, layout, mesh)

    train_pairs, eval_pairs = data.load_splits(cfg.data, tokenizer, shard=(proc, n_proc))
    phase_done()
    planned = plan.batches(cfg, tokenizer, layout, train_pairs, eval_pairs, mesh)
    tuning = tunings.for_config(cfg.tuning, family, model_cfg, ref_dtype=cfg.model.ref_dtype)
    state, state_sh, frozen, optimizer, lr_schedule = _train_state(cfg, mesh, tuning, params,
                                                                   planned.total_steps)
    del params
    if cfg.reference.ref_model_name_or_path and cfg.loss.needs_reference:
        frozen = _reference_model(cfg, tokenizer, model_cfg, state, state_sh)
    expect = {"model_config": checkpoint.model_config_record(model_cfg),
              "tuning": tuning.record()}

    ckpt = checkpoint.Checkpointer((mirror.remote if mirror else workdir) / "checkpoints",
                                   max_to_keep=cfg.run.save_total_limit)
    settings = workdirs.run_settings(cfg.flat, configs.resume_keys(),
                                     workdirs.data_fingerprint(train_pairs))
    run = Run(cfg=cfg, workdir=workdir, mesh=mesh, lead=proc == 0, tokenizer=tokenizer,
              model_cfg=model_cfg, tuning=tuning, layout=planned.layout,
              eval_layout=planned.eval_layout, loss_cfg=cfg.loss, train_pairs=train_pairs,
              eval_pairs=eval_pairs, train_batches=planned.train, eval_batches=planned.evals,
              total_steps=planned.total_steps, state=state, frozen=frozen, ckpt=ckpt, start=0, rng=jax.random.key(cfg.run.seed),
              expect=expect, settings=settings, mirror=mirror)
    _resume(run)
    phase_done()
    run.interrupts = interrupts
    if run.lead:  # only now that the resume checks passed
        workdirs.write_run_files(workdir, cfg.flat, tokenizer)
        run.push()
    if cfg.reference.precompute_ref_log_probs and cfg.loss.needs_reference:
        _precompute_reference(run)
    with run.clock.phase("compile"):
        _compile(run, optimizer, lr_schedule, state_sh)
    if run.lead:
        for line in run.describe():
            log.info("%s", line)
    return run


def _precompute_reference(run: Run):
    """The reference's log-probs of every pair, into the batches; then its params go if they
    are only the reference's (LoRA's base is the policy's too)."""
    for batches, logps in reference.precompute_for_run(run):
        batches.set_reference(*logps)
    if run.tuning.frees_frozen_after_precompute:
        run.frozen = {}


def _train_state(cfg, mesh, tuning, params, total_steps: int):
    """(state, its shardings, frozen params, optimizer, schedule), placed on the mesh."""
    parts = tuning.split(mesh, params, seed=cfg.run.seed)
    optimizer, lr_schedule = optim.build(cfg.optim, total_steps, parts.decay_mask)
    state, state_sh = sharding.init_state(mesh, parts.trainable, optimizer, parts.rules)
    frozen = parts.frozen if parts.frozen is not None else (
        tuning.frozen_copy(state, state_sh) if cfg.loss.needs_reference else {})
    if cfg.reference.sync_ref_model:  # TR-DPO: the reference moves, so it is train state
        state["ref"], state_sh["ref"], frozen = frozen, state_sh["params"], {}
    return state, state_sh, frozen, optimizer, lr_schedule


def _reference_model(cfg, tokenizer, model_cfg, state, state_sh) -> dict:
    """The reference from its own folder (config key ref_model_name_or_path), placed as the
    policy's params, in ``ref_dtype``: the model of the policy's family and shapes."""
    where = f"config key ref_model_name_or_path={cfg.reference.ref_model_name_or_path!r}"
    if cfg.tuning.lora_rank:
        raise ConfigError(f"{where}: LoRA's and DoRA's reference is their base with the adapters "
                          "off; set model_name_or_path to the reference, lora_init to the "
                          "policy's adapter")
    if cfg.reference.sync_ref_model:
        raise ConfigError(f"{where} and sync_ref_model=True: TR-DPO's reference starts as the "
                          "policy; set one of them")
    ref_cfg, params = hf.initial_model(dataclasses.replace(
        cfg.model, model_name_or_path=cfg.reference.ref_model_name_or_path), tokenizer)
    want = jax.tree.map(lambda a: tuple(a.shape), state["params"])
    have = jax.tree.map(lambda a: tuple(a.shape), params)
    if models.family_of(ref_cfg) is not models.family_of(model_cfg) or want != have:
        raise ConfigError(f"{where}: not a model of the policy's family and shapes "
                          f"({models.family_of(ref_cfg).name} against "
                          f"{models.family_of(model_cfg).name})")
    dtype = jnp.dtype(cfg.model.ref_dtype) if cfg.model.ref_dtype else None
    return sharding.place(jax.tree.map(lambda a: a.astype(dtype) if dtype else a, params),
                          state_sh["params"])


def _check_model(cfg, model_cfg, mesh):
    """The model's length limits and the mesh's splits, in the keys a user sets."""
    for field, limit in model_cfg.length_limits().items():
        if cfg.data.max_length > limit:
            raise ConfigError(f"config key max_length={cfg.data.max_length} exceeds the "
                              f"model's {field}={limit}")
    for size in (cfg.optim.train_batch_size, cfg.optim.eval_batch_size):
        sharding.check_model_fits(mesh, model_cfg, size)
    if cfg.loss.router_aux_loss_coef and not getattr(model_cfg, "num_experts", 0):
        raise ConfigError(f"config key router_aux_loss_coef={cfg.loss.router_aux_loss_coef}: "
                          f"this model ({type(model_cfg).__name__}) has no router (not a "
                          "mixture of experts)")


def _check_processes(cfg, n_proc: int):
    """What several processes cannot do, or cannot split."""
    if n_proc > 1 and cfg.data.length_buckets:
        raise ConfigError("config key length_buckets needs one process: hosts would pick "
                          "different shapes for the same step")
    if n_proc > 1 and cfg.layout.packing == "budget":
        raise ConfigError("config key packing='budget' needs one process: hosts would hold "
                          "different numbers of pairs in the same step (use 'balanced')")
    for key in ("train_batch_size", "eval_batch_size"):
        if getattr(cfg.optim, key) % n_proc:
            raise ConfigError(f"config key {key}={getattr(cfg.optim, key)} does not divide "
                              f"over {n_proc} processes")


def _resume(run: Run):
    """Restores the newest intact checkpoint over the freshly built run, after checking that it
    was written by a run of the same model and settings."""
    found = run.ckpt.restore_latest_good(checkpoint.abstract_like(run.state), expect=run.expect,
                                         check=run.tuning.check_record)
    if found is None:
        return
    start, state, record = found
    workdirs.check_resume(record, run.settings, run.cfg.run.allow_resume_changes,
                          run.ckpt.directory / str(start))
    if start > run.total_steps:
        raise ConfigError(f"{run.ckpt.directory / str(start)} is past this run's "
                          f"{run.total_steps} steps (config keys max_steps / num_train_epochs): "
                          "raise max_steps to continue it, or use a fresh --workdir")
    run.state = state
    run.train_batches.restore(record["data"])
    run.rng = jax.random.wrap_key_data(jnp.asarray(record["rng"], jnp.uint32))
    run.num_tokens = int(record.get("num_tokens", 0))
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
            seed=run.cfg.run.seed, sync=(run.cfg.reference.ref_model_mixup_alpha,
                                         run.cfg.reference.ref_model_sync_steps)
            if run.cfg.reference.sync_ref_model else None)
    run.eval_step = steps.make_eval_step(run.tuning, run.eval_layout, run.loss_cfg,
                                         out_shardings=replicated, **run.step_kw())


# =========================================================================== loop

class Progress:
    """The tqdm bar of finished steps: a step counts once its result is on the device
    (``is_ready``, no wait), so the bar never runs ahead; the first step, which compiles, is
    waited for and logged apart, so the ETA starts after compilation."""

    def __init__(self, run: Run, enabled: bool):
        self.run, self.enabled, self.bar, self.pending = run, enabled, None, []
        self.t0 = time.perf_counter()

    def dispatched(self, s: int, loss):
        if not self.enabled:
            return
        if self.bar is None:  # the first step of this process: compilation, then the step
            jax.block_until_ready(loss)
            log.info("compiled and ran the train step in %.1f s", time.perf_counter() - self.t0)
            self.bar = tqdm(total=self.run.total_steps, initial=s, desc="train", unit="step",
                            dynamic_ncols=True)
            return
        self.pending.append(loss)
        while self.pending and self.pending[0].is_ready():
            self.pending.pop(0)
            self.bar.update(1)

    def synced(self, m: dict):
        """Every dispatched step has finished (the loop fetched step s's results)."""
        if self.bar is not None:
            self.bar.update(len(self.pending))
            self.pending = []
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}",
                                 refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.update(len(self.pending))
            self.bar.close()


def loop(run: Run, metrics_log: tracking.MetricsLog | None):
    config, n_proc = run.cfg.run, run.n_proc
    progress = Progress(run, config.progress_bar and run.lead)
    clock, flops, peak = run.clock, run.step_flops(), goodput.peak_flops(
        run.cfg.tracking.peak_tflops)
    t_last, s_last, tokens = time.perf_counter(), run.start, 0
    for s in range(run.start + 1, run.total_steps + 1):
        tokens += int(run.batch["attention_mask"].sum()) * n_proc
        run.num_tokens += int((run.batch["num_tokens"] * run.batch["valid"]).sum()) * n_proc
        run.state, m = run.train_step(run.state, run.frozen,
                                      sharding.shard_batch(run.mesh, run.batch))
        progress.dispatched(s, m["loss"])
        # The cursor a checkpoint of step s must hold: where step s + 1's batch starts, so it is
        # taken before that batch is drawn (drawing it now overlaps host work with the device).
        cursor = run.train_batches.state()
        with clock.phase("data"):
            run.batch = run.next_update() if s < run.total_steps else None
        last = s == run.total_steps
        sync = run.cfg.reference
        if sync.sync_ref_model and s % sync.ref_model_sync_steps == 0 and run.lead:
            log.info("step %d: TR-DPO mixed the reference toward the policy (alpha %g)", s,
                     sync.ref_model_mixup_alpha)
        if run.interrupts is not None:
            run.interrupts.check_interrupt()
        log_now = s % config.logging_steps == 0 or last
        eval_now = run.eval_batches is not None and (
            (config.eval_steps and s % config.eval_steps == 0) or last)
        scheduled = s % config.save_steps == 0 or last
        stop = run.stop_requested(at_sync_point=log_now or eval_now or scheduled)
        save_now = scheduled or stop
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
        m["num_tokens"] = float(run.num_tokens)
        m["model_tflops_per_sec"] = flops / m["step_time"] / 1e12
        if peak:
            m["mfu"] = flops / m["step_time"] / peak
        t_last, s_last, tokens = now, s, 0
        run.last_train = m
        scalars = {f"train/{k}": v for k, v in m.items()} if log_now else {}
        if eval_now:
            with clock.phase("eval"):
                scalars.update(_evaluate(run, s, metrics_log))
        if log_now:
            scalars.update(clock.shares())
        if scalars and metrics_log is not None:
            metrics_log.write(s, scalars)
        progress.synced(m)
        if save_now:
            with clock.phase("checkpoint"):
                run.ckpt.save(s, run.state, run.record(cursor))
        if metrics_log is not None and run.mirror is not None:
            metrics_log.flush()
            run.push(every=0 if save_now else storage.PUSH_SECONDS)
        if stop:
            raise Stopped(f"stopped by SIGTERM at step {s}; the last complete checkpoint is "
                          f"{run.last_checkpoint()}; rerun the same command to resume", 143)
        t_last = time.perf_counter()  # eval and save are not step time
    progress.close()


def _evaluate(run: Run, s: int, metrics_log) -> dict:
    """Eval metrics (as logged) and samples at step ``s``."""
    run.last_eval = evaluation.evaluate(run.eval_step, run.state["params"],
                                        run.reference_params, run.eval_batches, run.mesh)
    log.info("step %d eval: %s", s, tracking.fmt(run.last_eval))
    run.last_samples = (s, _samples(run))
    if run.last_samples[1] and metrics_log is not None:
        metrics_log.write_samples(s, run.last_samples[1])
    return {f"eval/{k}": v for k, v in run.last_eval.items()}


def _samples(run: Run) -> list | None:
    """pi_ref / pi_theta completions (``evaluation.run_samples``); why they cannot be drawn is
    logged once per run."""
    samples, why = evaluation.run_samples(run)
    if why and not run.samples_skipped:
        log.info("%s", why)
        run.samples_skipped = True
    return samples


# =========================================================================== finish

def finish(run: Run) -> dict:
    """Exports, summarizes and compares samples. A rerun of a finished run reports it, redoing
    only what a kill cut short (summary.json is written last)."""
    summary_path = run.workdir / "summary.json"
    if run.start == run.total_steps and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if run.lead:
            print(f"{run.where(run.workdir)} holds a finished run of {run.total_steps} steps",
                  flush=True)
            tracking.print_summary(summary)
        return summary
    if run.start == run.total_steps:  # finished, but a kill cut the export or summary short
        run.last_train, run.last_eval = workdirs.last_metrics(run.workdir / "metrics.jsonl")
    trainable = sharding.to_host(run.state["params"])  # every process (multi-host: a gather)
    host_params = run.tuning.merged_params(trainable, run.frozen)
    if not checkpoint.all_finite(host_params):
        raise NonFiniteError(f"the params at step {run.total_steps} are not finite: nothing is "
                             f"exported; the last complete checkpoint is {run.last_checkpoint()}")
    hf_dir = None
    if run.cfg.run.export_hf and run.lead:
        hf_dir = hf.save_params(run.model_cfg, host_params, run.workdir / "hf",
                                dtype=run.tuning.export_dtype())
        run.tokenizer.save_pretrained(str(hf_dir))
        run.tuning.export(run.workdir, trainable, base_name=run.cfg.model.model_name_or_path)
    summary = {
        "steps": run.total_steps,
        "train/loss": run.last_train.get("loss"),
        "eval/loss": run.last_eval.get("loss"),
        "eval/rewards/accuracies": run.last_eval.get("rewards/accuracies"),
        "eval/rewards/margins": run.last_eval.get("rewards/margins"),
        "checkpoint": str(run.ckpt.directory / str(run.total_steps)),
        "hf_export": run.where(hf_dir) if hf_dir else None,
    }
    if run.start < run.total_steps:  # this process trained: where its time went
        summary["goodput"] = dict(run.clock.summary(), mfu=run.last_train.get("mfu"),
                                  model_tflops_per_sec=run.last_train.get("model_tflops_per_sec"))
    step, samples = run.last_samples
    if step != run.total_steps or samples is None:  # none drawn from the final params yet
        samples = _samples(run)
    if samples is not None:
        summary["samples"] = samples
    if run.lead:
        tracking.print_summary(summary)
        tmp = summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(summary_path)
        run.push(strict=True)
    return summary


# =========================================================================== entry point

def train_and_evaluate(config, workdir) -> dict:
    """Trains, evaluates, checkpoints and exports; returns the final summary. ``config``: the
    flat keys (a ConfigDict, as configs/*.py make) or a built ``configs.Config``.

    Whatever stops a run, the save in flight is finished first: SIGTERM saves the current step
    and stops (``Stopped``, exit code 143); Ctrl-C stops (130); an error names the last
    complete checkpoint. A rerun of the same command resumes from it.
    """
    cfg = config if isinstance(config, configs.Config) else configs.build(config)
    if cfg.online.online_rounds:  # on-policy rounds: each round's training is a run of its own
        from dpo_jax import online
        return online.run_rounds(cfg, workdir)
    mesh_cfg = cfg.mesh
    if mesh_cfg.distributed:  # multi-host: before any other JAX call touches the devices
        jax.distributed.initialize(
            coordinator_address=mesh_cfg.coordinator_address or None,
            num_processes=mesh_cfg.num_processes or None,
            process_id=mesh_cfg.process_id if mesh_cfg.process_id >= 0 else None)
    configs.check_backend(cfg)
    workdir, lock, mirror = workdirs.open_workdir(workdir, jax.process_index(),
                                                  jax.process_count())
    handler, interrupts, run = tracking.file_logging(workdir), Interrupts(), None
    try:
        run = setup(cfg, workdir, interrupts, mirror)
        if run.start < run.total_steps:
            metrics_log = (tracking.MetricsLog(workdir, run.start, cfg.tracking, cfg.flat)
                           if run.lead else None)
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
        if mirror is not None:  # train.log's last lines (an error, a stop) reach the bucket too
            try:
                if jax.process_index() == 0:
                    mirror.push()
            except DpoError as e:  # the lease was lost: another run owns the workdir now
                log.error("%s", e)
            mirror.close()
        lock.release()
