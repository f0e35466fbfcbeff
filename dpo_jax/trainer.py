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
from flax import nnx

from dpo_jax import (checkpoint, data, evaluation, hf, hub, layouts, models, optim, reference,
                     sharding, steps)
from dpo_jax.losses import LossConfig
from dpo_jax.models import common
from dpo_jax.tracking import MetricsLog, file_logging

log = logging.getLogger(__name__)


# =========================================================================== building blocks

def build_model(config, tokenizer, mesh=None) -> tuple[object, dict]:
    """(model config, params) of the initial policy (= the reference): from an HF checkpoint or
    random from ``config.model`` (an HF config.json in miniature: ``model_type`` and the family's
    fields). With a mesh, random params are created already sharded; checkpoint params stay host
    numpy arrays for ``sharding.init_state`` to place."""
    compute = dict(dtype=config.dtype, remat=config.remat, remat_policy=config.remat_policy)
    if config.model_name_or_path:
        cfg, params = hf.load_pretrained_params(config.model_name_or_path, **compute)
    else:
        spec = dict(config.model)
        spec.setdefault("model_type", "gpt2")  # workdirs written before families had no key
        spec.setdefault("bos_token_id", tokenizer.bos_token_id
                        if tokenizer.bos_token_id is not None else 0)
        spec.setdefault("eos_token_id", tokenizer.eos_token_id)
        cfg = hf.config_from_hf(spec, source="config key model", **compute)
        family = models.family_of(cfg)

        def init_fn():
            return common.params_of(family.model_cls(cfg, rngs=nnx.Rngs(config.seed)))
        params = (sharding.init_params(mesh, init_fn, family.rules) if mesh is not None
                  else jax.jit(init_fn)())
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{cfg.vocab_size} (config key model.vocab_size, or another tokenizer)")
    return cfg, params


def scoring_window(config) -> int:
    """The static completion window of the completion-only head (0 = head on every position)."""
    if config.layout == "prefix_sharing" or config.completion_only_head:
        return config.max_completion_length
    return 0


# =========================================================================== setup

@dataclasses.dataclass
class Run:
    """Everything ``setup`` builds; ``loop`` advances ``state``, ``finish`` reports."""

    config: object
    workdir: Path
    mesh: object
    lead: bool                  # the process that logs and exports
    tokenizer: object
    model_cfg: object
    tuning: steps.FullTuning
    layout: layouts.Layout
    loss_cfg: LossConfig
    train_pairs: data.TokenizedPairs
    eval_pairs: data.TokenizedPairs | None
    train_batches: data.PairBatches
    eval_batches: data.PairBatches | None
    total_steps: int
    state: dict
    frozen: dict                # {} once the reference is precomputed (see steps.FullTuning)
    ckpt: checkpoint.Checkpointer
    start: int                  # the step resumed from (0 for a fresh run)
    rng: jax.Array
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
                "model_config": checkpoint.model_config_record(self.model_cfg),
                "step": int(self.state["step"])}


def setup(config, workdir: Path) -> Run:
    loss_cfg = LossConfig.from_config(config)
    optim.validate(config)  # fail on bad keys before anything heavy is built
    if config.distributed:  # multi-host: before any other JAX call touches the devices
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address or None,
            num_processes=config.num_processes or None,
            process_id=config.process_id if config.process_id >= 0 else None)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    n_proc, proc = jax.process_count(), jax.process_index()
    lead = proc == 0
    if n_proc > 1 and config.length_buckets:
        raise ValueError("length_buckets need one process: hosts would pick different shapes "
                         "for the same step")
    for key in ("train_batch_size", "eval_batch_size"):
        if config[key] % n_proc:
            raise ValueError(f"{key}={config[key]} does not divide over {n_proc} processes")
    if lead:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    tokenizer = hub.load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path)
    if lead:
        tokenizer.save_pretrained(str(workdir / "tokenizer"))
    model_cfg, params = build_model(config, tokenizer, mesh)
    family = models.family_of(model_cfg)
    if config.max_length > model_cfg.max_positions:
        raise ValueError(f"max_length={config.max_length} exceeds the model's "
                         f"{model_cfg.max_positions} positions")
    for key in ("train_batch_size", "eval_batch_size"):
        sharding.check_model_fits(mesh, model_cfg, config[key])
    tuning = steps.FullTuning(nnx.graphdef(common.abstract(family.model_cls, model_cfg)))
    layout = layouts.make(config.layout, scoring_window(config))

    train_pairs, eval_pairs = data.load_splits(config, tokenizer, shard=(proc, n_proc))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_kw = dict(max_length=config.max_length, pad_id=pad_id, buckets=config.length_buckets,
                    layout=layout)
    train_batches = data.PairBatches(train_pairs, batch_size=config.train_batch_size // n_proc,
                                     seed=config.seed, **batch_kw)
    eval_batches = (data.PairBatches(eval_pairs, batch_size=config.eval_batch_size // n_proc,
                                     shuffle=False, **batch_kw) if eval_pairs else None)
    log.info("train data: %s; padding %.1f%%", data.summary_line(train_pairs.stats),
             100 * train_batches.padding_fraction())

    accum = config.gradient_accumulation_steps
    micro_per_epoch = train_batches.steps_per_epoch
    if n_proc > 1:  # every process must run the same number of steps
        from jax.experimental import multihost_utils
        micro_per_epoch = int(multihost_utils.process_allgather(np.int32(micro_per_epoch)).min())
    updates_per_epoch = micro_per_epoch // accum
    if updates_per_epoch == 0:
        raise ValueError(f"{micro_per_epoch} micro-batches per epoch make no update of "
                         f"gradient_accumulation_steps={accum}")
    total_steps = config.max_steps if config.max_steps > 0 else \
        config.num_train_epochs * updates_per_epoch
    optimizer, lr_schedule = optim.build(config, total_steps)
    state, state_sh = sharding.init_state(mesh, params, optimizer, family.rules)
    del params
    frozen = {}
    if loss_cfg.needs_reference:
        # Its own buffers (the policy's are donated to the step), in ref_dtype if asked: the
        # reference is never updated, so bfloat16 halves its memory at no cost to the policy.
        ref_dtype = jnp.dtype(config.ref_dtype) if config.ref_dtype else None
        frozen = jax.tree.map(
            lambda a, sh: jax.device_put(a, sh, may_alias=False).astype(ref_dtype or a.dtype),
            state["params"], state_sh["params"])

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.save_total_limit)
    run = Run(config=config, workdir=workdir, mesh=mesh, lead=lead, tokenizer=tokenizer,
              model_cfg=model_cfg, tuning=tuning, layout=layout, loss_cfg=loss_cfg,
              train_pairs=train_pairs, eval_pairs=eval_pairs, train_batches=train_batches,
              eval_batches=eval_batches, total_steps=total_steps, state=state, frozen=frozen,
              ckpt=ckpt, start=0, rng=jax.random.key(config.seed))
    _resume(run)
    if config.precompute_ref_log_probs and loss_cfg.needs_reference:
        _precompute(run)
    _compile(run, optimizer, lr_schedule, state_sh)
    return run


def _resume(run: Run):
    """Restores the latest complete checkpoint over the freshly built run."""
    start = run.ckpt.latest_step()
    if start is None:
        return
    state, record = run.ckpt.restore(start, checkpoint.abstract_like(run.state),
                                     model_config=checkpoint.model_config_record(run.model_cfg))
    run.state = state
    run.train_batches.restore(record["data"])
    run.rng = jax.random.wrap_key_data(jnp.asarray(record["rng"], jnp.uint32))
    run.start = start
    log.info("resumed from %s at step %d", run.ckpt.directory / str(start), start)


def _precompute(run: Run):
    """Scores the data with the reference once (cached in the workdir), then frees it."""
    config = run.config
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    ref_fn = steps.make_ref_logps_fn(run.tuning, run.layout, out_shardings=replicated,
                                     **run.step_kw())
    key = reference.fingerprint(checkpoint.model_config_record(run.model_cfg),
                                config.model_name_or_path,
                                config.seed, config.ref_dtype, config.dtype,
                                config.logprob_chunk_size, run.n_proc)
    for pairs, batches in ((run.train_pairs, run.train_batches),
                           (run.eval_pairs, run.eval_batches)):
        if pairs is not None:
            fp = reference.fingerprint(key, jax.process_index(), pairs.prompt, pairs.chosen,
                                       pairs.rejected)
            reference.precompute(pairs, ref_fn, run.state["params"], run.frozen, batches,
                                 run.workdir / f"ref_logps-{fp}.npz", run.mesh)
    run.frozen = {}  # never needed again: free its memory


def _compile(run: Run, optimizer, lr_schedule, state_sh):
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    frozen_sh = jax.tree.map(lambda a: a.sharding, run.frozen)
    if run.start < run.total_steps:
        run.batch = run.next_update()
        batch_sh = {k: sharding.batch_sharding(run.mesh, v.ndim) for k, v in run.batch.items()}
        run.train_step = steps.make_train_step(
            run.tuning, run.layout, run.loss_cfg, optimizer, lr_schedule, **run.step_kw(),
            in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated))
    run.eval_step = steps.make_eval_step(run.tuning, run.layout, run.loss_cfg,
                                         out_shardings=replicated, **run.step_kw())


# =========================================================================== loop

def loop(run: Run, metrics_log: MetricsLog | None):
    config, n_proc = run.config, run.n_proc
    progress = None
    if config.progress_bar and run.lead:
        from tqdm import tqdm
        progress = tqdm(total=run.total_steps, initial=run.start, desc="train", unit="step",
                        dynamic_ncols=True)
    saved_at, t_last, s_last, tokens = run.start, time.perf_counter(), run.start, 0
    for s in range(run.start + 1, run.total_steps + 1):
        tokens += int(run.batch["attention_mask"].sum()) * n_proc
        run.state, m = run.train_step(run.state, run.frozen,
                                      sharding.shard_batch(run.mesh, run.batch))
        # The cursor a checkpoint of step s must hold: where step s + 1's batch starts, so it is
        # taken before that batch is drawn (drawing it now overlaps host work with the device).
        cursor = run.train_batches.state()
        run.batch = run.next_update() if s < run.total_steps else None
        last = s == run.total_steps
        log_now = s % config.logging_steps == 0 or last
        eval_now = run.eval_batches is not None and (
            (config.eval_steps and s % config.eval_steps == 0) or last)
        save_now = s % config.save_steps == 0 or last
        if progress is not None:
            progress.update(1)
        if not (log_now or eval_now or save_now):
            continue  # the device runs on; nothing here needs its results yet
        bad = int(run.state["bad_step"])  # waits for step s
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if bad:
            raise FloatingPointError(f"non-finite loss or gradient at step {bad}; the last good "
                                     f"checkpoint is step {saved_at} in {run.ckpt.directory}")
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
            log.info("step %d eval: %s", s, _fmt(run.last_eval))
        if scalars and metrics_log is not None:
            metrics_log.write(s, scalars)
        if progress is not None:
            progress.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}",
                                 refresh=False)
        if save_now:
            run.ckpt.save(s, run.state, run.record(cursor))
            saved_at = s
        t_last = time.perf_counter()  # eval and save are not step time
    if progress is not None:
        progress.close()


# =========================================================================== finish

def finish(run: Run) -> dict:
    config = run.config
    host_params = _to_host(run.state["params"])
    hf_dir = None
    if config.export_hf and run.lead:
        hf_dir = hf.save_params(run.model_cfg, host_params, run.workdir / "hf")
        run.tokenizer.save_pretrained(str(hf_dir))
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
        _print_summary(summary)
        (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _to_host(tree):
    """numpy copies of (possibly sharded, possibly multi-host) arrays, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _fmt(m: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items())


def _print_summary(s: dict):
    lines = [f"done: {s['steps']} steps; final train loss {s['train/loss']:.4f}"]
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


# =========================================================================== entry point

def train_and_evaluate(config, workdir) -> dict:
    """Trains, evaluates, checkpoints and exports; returns the final summary."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    handler = file_logging(workdir)
    try:
        run = setup(config, workdir)
        metrics_log = MetricsLog(workdir, run.start) if run.lead else None
        try:
            loop(run, metrics_log)
        finally:
            run.ckpt.close()
            if metrics_log is not None:
                metrics_log.close()
        return finish(run)
    finally:
        logging.getLogger("dpo_jax").removeHandler(handler)
        handler.close()
