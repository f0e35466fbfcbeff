"""``train_and_evaluate(config, workdir)``: builds everything, runs the loop, never loses work.

Order at start (it matters for exact resume): build the model and data exactly as a fresh run
would, then restore the latest complete checkpoint over them (params, optimizer state, step, data
cursor), then drop metrics logged after that checkpoint, so every step is logged once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax import checkpoint, data, hf, optim, sampling, sharding, step
from dpo_jax.losses import LossConfig
from dpo_jax.model import GPT2, GPT2Config, abstract_model

log = logging.getLogger(__name__)


# =========================================================================== building

def loss_config(config) -> LossConfig:
    """The validated loss options (errors name the offending value, before anything is built)."""
    types = tuple(t.strip() for t in str(config.loss_type).split(",") if t.strip())
    weights = (tuple(float(w) for w in str(config.loss_weights).split(","))
               if str(config.loss_weights).strip() else None)
    return LossConfig(loss_type=types, loss_weights=weights, beta=config.beta,
                      label_smoothing=config.label_smoothing,
                      reference_free=config.reference_free,
                      rpo_alpha=config.rpo_alpha or None, simpo_gamma=config.simpo_gamma,
                      discopop_tau=config.discopop_tau)


def build_model(config, tokenizer, mesh=None) -> tuple[GPT2Config, dict]:
    """(model config, params) of the initial policy (= the reference): from an HF checkpoint or
    random from ``config.model``. With a mesh, random params are created already sharded;
    checkpoint params stay host numpy arrays for ``sharding.init_state`` to place."""
    compute = dict(dtype=config.dtype, remat=config.remat, remat_policy=config.remat_policy)
    if config.model_name_or_path:
        cfg, params = hf.load_pretrained_params(config.model_name_or_path, **compute)
    else:
        m = config.model
        cfg = GPT2Config(
            vocab_size=m.vocab_size, n_positions=m.n_positions, n_embd=m.n_embd,
            n_layer=m.n_layer, n_head=m.n_head,
            bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0,
            eos_token_id=tokenizer.eos_token_id, **compute)

        def init_fn():
            return nnx.to_pure_dict(nnx.state(GPT2(cfg, rngs=nnx.Rngs(config.seed)), nnx.Param))
        params = sharding.init_params(mesh, init_fn) if mesh is not None else jax.jit(init_fn)()
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{cfg.vocab_size} (config key model.vocab_size, or another tokenizer)")
    if config.max_length > cfg.n_positions:
        raise ValueError(f"max_length={config.max_length} exceeds the model's n_positions="
                         f"{cfg.n_positions}")
    return cfg, params


def scoring_window(config) -> int:
    """The static completion window of the completion-only head (0 = head on every position)."""
    if config.layout == "prefix_sharing" and not config.max_completion_length:
        raise ValueError("layout='prefix_sharing' needs max_completion_length > 0")
    if config.layout == "prefix_sharing" or config.completion_only_head:
        return config.max_completion_length
    return 0


def data_config(config, source: str, split: str) -> data.DataConfig:
    return data.DataConfig(
        source=source, split=split, prompt_column=config.prompt_column,
        chosen_column=config.chosen_column, rejected_column=config.rejected_column,
        max_length=config.max_length, max_prompt_length=config.max_prompt_length,
        max_completion_length=config.max_completion_length,
        add_bos=config.add_bos, on_bad_row=config.on_bad_row,
        cache_dir=config.data_cache_dir or None)


def load_data(config, tokenizer, shard=(0, 1)):
    """(train pairs, eval pairs or None): this process's share (index, count) of each split."""
    if not config.dataset_name:
        raise ValueError("config key dataset_name is empty: name a data file, folder or hub id")
    train = data.load_pairs(data_config(config, config.dataset_name, config.dataset_train_split),
                            tokenizer, shard=shard)
    eval_source = config.eval_dataset_name or config.dataset_name
    same_file = not config.eval_dataset_name and Path(config.dataset_name).suffix.lower() in \
        data.FILE_FORMATS
    if not config.dataset_test_split or same_file:
        log.info("no evaluation data (set eval_dataset_name or dataset_test_split)")
        return train, None
    return train, data.load_pairs(data_config(config, eval_source, config.dataset_test_split),
                                  tokenizer, shard=shard)


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (list, tuple)) and p and isinstance(p[0], np.ndarray):
            for a in p:
                h.update(np.ascontiguousarray(a).tobytes())
                h.update(b"|")
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:20]


def precompute_reference(pairs, ref_fn, ref_params, batches: data.PairBatches, cache: Path, mesh):
    """Reference log-probs of every pair, computed once (and cached on disk), stored in ``pairs``
    so that every later batch carries them."""
    if cache.exists():
        z = np.load(cache)
        pairs.ref_chosen, pairs.ref_rejected = z["chosen"], z["rejected"]
        log.info("reference log-probs read from %s", cache)
        return
    chosen = np.zeros(len(pairs), np.float32)
    rejected = np.zeros(len(pairs), np.float32)
    for rows, batch in batches.eval_batches_with_rows():
        c, r = jax.device_get(ref_fn(ref_params, sharding.shard_batch(mesh, batch, False)))
        c, r = _local_block(c), _local_block(r)
        chosen[rows], rejected[rows] = c[:len(rows)], r[:len(rows)]
    pairs.ref_chosen, pairs.ref_rejected = chosen, rejected
    tmp = cache.with_suffix(f".tmp{jax.process_index()}.npz")
    np.savez(tmp, chosen=chosen, rejected=rejected)
    os.replace(tmp, cache)
    log.info("reference log-probs of %d pairs written to %s", len(pairs), cache)


def _local_block(x):
    """This process's block of a replicated per-pair result (blocks are in process order)."""
    n = len(x) // jax.process_count()
    return x[jax.process_index() * n:(jax.process_index() + 1) * n]


# =========================================================================== logging

class MetricsLog:
    """workdir/metrics.jsonl (one line per logged step) and TensorBoard event files."""

    def __init__(self, workdir: Path, resume_step: int | None):
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():  # drop what was logged after the checkpoint we resume from
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

    def write(self, step_: int, scalars: dict):
        self.file.write(json.dumps({"step": step_, **scalars}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step_)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _setup_file_logging(workdir: Path):
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dpo_jax").addHandler(handler)
    logging.getLogger("dpo_jax").setLevel(logging.INFO)
    return handler


# =========================================================================== the loop

def evaluate(eval_step, params, ref_params, batches: data.PairBatches, mesh) -> dict:
    """Means over every eval pair (batches weighted by their valid pairs)."""
    sums, total = {}, 0.0
    for batch in batches.eval_batches():
        m = jax.device_get(eval_step(params, ref_params, sharding.shard_batch(mesh, batch, False)))
        n = float(batch["valid"].sum())  # this process's count: every process has the same
        total += n
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
    return {k: v / total for k, v in sums.items()}


def train_and_evaluate(config, workdir) -> dict:
    """Trains, evaluates, checkpoints and exports; returns the final summary."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    handler = _setup_file_logging(workdir)
    try:
        return _train(config, workdir)
    finally:
        logging.getLogger("dpo_jax").removeHandler(handler)
        handler.close()


def _train(config, workdir: Path) -> dict:
    loss_cfg = loss_config(config)
    optim.validate(config)  # fail on bad keys before anything heavy is built
    if config.distributed:  # multi-host: before any other JAX call touches the devices
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address or None,
            num_processes=config.num_processes or None,
            process_id=config.process_id if config.process_id >= 0 else None)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    n_proc, proc = jax.process_count(), jax.process_index()
    lead = proc == 0  # the process that writes logs and exports
    if n_proc > 1 and config.length_buckets:
        raise ValueError("length_buckets need one process: hosts would pick different shapes "
                         "for the same step")
    for key in ("train_batch_size", "eval_batch_size"):
        if config[key] % n_proc:
            raise ValueError(f"{key}={config[key]} does not divide over {n_proc} processes")
    if lead:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    tokenizer = hf.load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path)
    if lead:
        tokenizer.save_pretrained(str(workdir / "tokenizer"))
    model_cfg, params = build_model(config, tokenizer, mesh)
    for key in ("train_batch_size", "eval_batch_size"):
        sharding.check_model_fits(mesh, model_cfg, config[key])
    graphdef = nnx.graphdef(abstract_model(model_cfg))

    train_pairs, eval_pairs = load_data(config, tokenizer, shard=(proc, n_proc))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_kw = dict(max_length=config.max_length, pad_id=pad_id, buckets=config.length_buckets,
                    layout=config.layout, completion_window=scoring_window(config))
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
    state, state_sh = sharding.init_state(mesh, params, optimizer)
    param_sh = state_sh["params"]
    del params
    ref_params = None
    if loss_cfg.needs_reference:
        # Its own buffers (the policy's are donated to the step), in ref_dtype if asked: the
        # reference is never updated, so bfloat16 halves its memory at no cost to the policy.
        ref_dtype = jnp.dtype(config.ref_dtype) if config.ref_dtype else None
        ref_params = jax.tree.map(
            lambda a, sh: jax.device_put(a, sh, may_alias=False).astype(ref_dtype or a.dtype),
            state["params"], param_sh)

    # ---- resume
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.save_total_limit)
    model_record = checkpoint.model_config_record(model_cfg)
    start = ckpt.latest_step()
    rng = jax.random.key(config.seed)
    if start is not None:
        state, record = ckpt.restore(start, checkpoint.abstract_like(state),
                                     model_config=model_record)
        train_batches.restore(record["data"])
        rng = jax.random.wrap_key_data(jnp.asarray(record["rng"], jnp.uint32))
        log.info("resumed from %s at step %d", ckpt.directory / str(start), start)
    start = start or 0
    metrics_log = MetricsLog(workdir, start) if lead else None

    # ---- steps
    ref_sh = None if ref_params is None else jax.tree.map(lambda a: a.sharding, ref_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_kw = dict(chunk_size=config.logprob_chunk_size, pair_blocks=n_proc)
    if config.precompute_ref_log_probs and loss_cfg.needs_reference:
        ref_fn = step.make_ref_logps_fn(graphdef, out_shardings=replicated, **step_kw)
        key = _fingerprint(model_record, config.model_name_or_path, config.seed,
                           config.ref_dtype, config.dtype, config.logprob_chunk_size, n_proc)
        for pairs, batches in ((train_pairs, train_batches), (eval_pairs, eval_batches)):
            if pairs is not None:
                fp = _fingerprint(key, proc, pairs.prompt, pairs.chosen, pairs.rejected)
                precompute_reference(pairs, ref_fn, ref_params, batches,
                                     workdir / f"ref_logps-{fp}.npz", mesh)
        ref_params = ref_sh = None  # never needed again: free its memory

    def next_update():
        return data.stack_batches([next(train_batches) for _ in range(accum)])

    batch = next_update() if start < total_steps else None
    if batch is not None:
        batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        train_step = step.make_train_step(
            graphdef, graphdef, loss_cfg, optimizer, lr_schedule, **step_kw,
            in_shardings=(state_sh, ref_sh, batch_sh), out_shardings=(state_sh, replicated))
    eval_step = step.make_eval_step(graphdef, graphdef, loss_cfg, out_shardings=replicated,
                                    **step_kw)

    def record_for_checkpoint(cursor):
        return {"data": cursor, "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                "model_config": model_record, "step": int(state["step"])}

    progress = None
    if config.progress_bar and lead:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=start, desc="train", unit="step",
                        dynamic_ncols=True)
    last_train, last_eval, saved_at = {}, {}, start
    t_last = time.perf_counter()
    for s in range(start + 1, total_steps + 1):
        n_tokens = int(batch["attention_mask"].sum()) * n_proc
        state, m = train_step(state, ref_params, sharding.shard_batch(mesh, batch))
        # The cursor a checkpoint of step s must hold: where step s + 1's batch starts, so it is
        # taken before that batch is drawn (drawing it now overlaps host work with the device).
        cursor = train_batches.state()
        batch = next_update() if s < total_steps else None
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        m["step_time"], t_last = now - t_last, now
        m["tokens_per_sec"] = n_tokens / m["step_time"]
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise FloatingPointError(f"non-finite loss or gradient at step {s}: loss={m['loss']}, "
                                     f"grad_norm={m['grad_norm']}; the last good checkpoint is "
                                     f"step {saved_at} in {ckpt.directory}")
        last_train = m
        scalars = {f"train/{k}": v for k, v in m.items()} if s % config.logging_steps == 0 \
            or s == total_steps else {}
        if eval_batches is not None and ((config.eval_steps and s % config.eval_steps == 0)
                                         or s == total_steps):
            last_eval = evaluate(eval_step, state["params"], ref_params, eval_batches, mesh)
            scalars.update({f"eval/{k}": v for k, v in last_eval.items()})
            log.info("step %d eval: %s", s, _fmt(last_eval))
        if scalars and metrics_log is not None:
            metrics_log.write(s, scalars)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}",
                                 refresh=False)
        if s % config.save_steps == 0 or s == total_steps:
            ckpt.save(s, state, record_for_checkpoint(cursor))
            saved_at = s
    if progress is not None:
        progress.close()
    ckpt.close()
    if metrics_log is not None:
        metrics_log.close()

    # ---- export and compare
    host_params = _to_host(state["params"])
    hf_dir = None
    if config.export_hf and lead:
        hf_dir = hf.save_pretrained(hf.build(model_cfg, host_params), workdir / "hf")
        tokenizer.save_pretrained(str(hf_dir))
    summary = {
        "steps": total_steps,
        "train/loss": last_train.get("loss"),
        "eval/loss": last_eval.get("loss"),
        "eval/rewards/accuracies": last_eval.get("rewards/accuracies"),
        "eval/rewards/margins": last_eval.get("rewards/margins"),
        "checkpoint": str(ckpt.directory / str(total_steps)),
        "hf_export": str(hf_dir) if hf_dir else None,
    }
    if config.sample_prompts and n_proc == 1:
        pairs = eval_pairs if eval_pairs is not None else train_pairs
        prompts = [tokenizer.decode(p) for p in pairs.prompt[:config.sample_prompts]]
        ref_host = (_to_host(ref_params) if ref_params is not None
                    else _to_host(build_model(config, tokenizer)[1]))
        summary["samples"] = compare_samples(graphdef, ref_host, host_params, tokenizer,
                                             prompts, config)
    if lead:
        _print_summary(summary)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _to_host(tree):
    """numpy copies of (possibly sharded, possibly multi-host) arrays, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def compare_samples(graphdef, ref_params, policy_params, tokenizer, prompts, config) -> list:
    cfg = sampling.SamplingConfig(max_new_tokens=config.sample_max_new_tokens,
                                  eos_id=tokenizer.eos_token_id)
    ref, theta = (sampling.complete(nnx.merge(graphdef, jax.tree.map(jnp.asarray, p)), tokenizer,
                                    prompts, cfg)
                  for p in (ref_params, policy_params))
    return [{"prompt": p, "pi_ref": r, "pi_theta": t} for p, r, t in zip(prompts, ref, theta)]


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
