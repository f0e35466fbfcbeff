"""Every config key checked when the config is read, before anything heavy is built.

``check_config(config)`` runs one check per key of configs/default.py (``CHECKS``; a test makes
sure no key lacks one) and then the checks that relate keys; each error names the key and its
value. ``check_backend`` holds what depends on the devices (run after ``jax.distributed``
initializes).
"""

from __future__ import annotations

from dpo_jax.errors import ConfigError, at_least, choice


def _text(key, v, c):
    if not isinstance(v, str):
        raise ConfigError(f"config key {key}={v!r}: must be a string")


def _nonempty(key, v, c):
    _text(key, v, c)
    if not v.strip():
        raise ConfigError(f"config key {key} is empty")


def _flag(key, v, c):
    if not isinstance(v, bool):
        raise ConfigError(f"config key {key}={v!r}: must be True or False")


def _int(low=None, why=""):
    def check(key, v, c):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key {key}={v!r}: must be an integer")
        if low is not None:
            at_least(key, v, low, why)
    return check


def _number(low=None, high=None, *, open_low=False, open_high=False):
    def check(key, v, c):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ConfigError(f"config key {key}={v!r}: must be a number")
        bad_low = low is not None and (v <= low if open_low else v < low)
        bad_high = high is not None and (v >= high if open_high else v > high)
        if bad_low or bad_high:
            lo = "" if low is None else f"{'(' if open_low else '['}{low}, "
            hi = "inf)" if high is None else f"{high}{')' if open_high else ']'}"
            raise ConfigError(f"config key {key}={v!r}: must lie in {lo or '(-inf, '}{hi}")
    return check


def _one_of(*valid):
    return lambda key, v, c: choice(key, v, valid)


def _model(key, v, c):
    from dpo_jax import models
    if c.model_name_or_path:
        return  # the architecture comes from the checkpoint
    spec = dict(v)
    try:
        models.family_for(spec.get("model_type", "gpt2"))
    except ValueError as e:
        raise ConfigError(f"config key model.model_type: {e}") from None
    for k, x in spec.items():
        if isinstance(x, int) and not isinstance(x, bool) and x <= 0 and k != "model_type":
            raise ConfigError(f"config key model.{k}={x!r}: must be > 0")


def _dtype(key, v, c):
    from dpo_jax.models.common import DTYPES
    if key == "ref_dtype" and v == "":
        return
    choice(key, v, tuple(DTYPES))


def _remat_policy(key, v, c):
    from dpo_jax.models.common import REMAT
    choice(key, v, tuple(REMAT))


def _mesh_axis(key, v, c):
    if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v >= 1):
        raise ConfigError(f"config key {key}={v!r}: must be -1 (the devices left over) or >= 1")


def _buckets(key, v, c):
    try:
        sizes = [int(b) for b in v]
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key}={v!r}: must be a tuple of lengths") from None
    # a row's length: prefix sharing holds the prompt and both completions
    longest, what = c.max_length, f"max_length={c.max_length}"
    if c.layout == "prefix_sharing":
        longest += c.max_completion_length
        what += f" + max_completion_length={c.max_completion_length} (prefix_sharing)"
    bad = [b for b in sizes if not 1 < b <= longest]
    if bad:
        raise ConfigError(f"config key {key}={tuple(v)!r}: every length must lie in "
                          f"(1, {what}]; {bad} do not")


def _regex(key, v, c):
    import re
    _text(key, v, c)
    try:
        re.compile(v)
    except re.error as e:
        raise ConfigError(f"config key {key}={v!r}: not a regular expression ({e})") from None


def _loss(key, v, c):
    pass  # checked as a whole by LossConfig.from_config in check_config


def _optim(key, v, c):
    from dpo_jax.optim import OPTIMIZERS
    choice(key, v, OPTIMIZERS)


def _schedule(key, v, c):
    from dpo_jax.optim import SCHEDULES
    choice(key, v, SCHEDULES)


def _attention(key, v, c):
    from dpo_jax.models.attention import CHOICES
    choice(key, v, CHOICES)


def _packing(key, v, c):
    choice(key, v, ("none", "exact", "balanced", "budget"))


def _layout(key, v, c):
    from dpo_jax.layouts import LAYOUTS
    choice(key, v, tuple(LAYOUTS))


def _report_to(key, v, c):
    from dpo_jax.tracking import TRACKERS
    _text(key, v, c)
    names = [t.strip() for t in v.split(",") if t.strip()]
    bad = [t for t in names if t not in TRACKERS + ("none",)]
    if bad or not names or ("none" in names and len(names) > 1):
        raise ConfigError(f"config key {key}={v!r}: a comma-separated list of "
                          f"{', '.join(TRACKERS)}, or 'none'")


def _allow_changes(key, v, c):
    _text(key, v, c)
    from dpo_jax.workdir import RUN_KEYS
    names = [k.strip() for k in v.split(",") if k.strip()]
    unknown = [k for k in names if k != "all" and k not in RUN_KEYS]
    if unknown:
        raise ConfigError(f"config key {key}: {unknown} are not keys that a resume checks; they "
                          f"are {', '.join(RUN_KEYS)} (or 'all')")


CHECKS = {
    # model
    "model_name_or_path": _text, "model": _model, "tokenizer_name_or_path": _text,
    "dtype": _dtype, "ref_dtype": _dtype, "remat": _flag, "remat_policy": _remat_policy,
    "attention": _attention, "packing": _packing, "pack_rows": _int(0),
    # LoRA
    "lora_rank": _int(0, "0 = full fine-tuning"), "lora_alpha": _number(0, open_low=True),
    "lora_dropout": _number(0, 1, open_high=True), "lora_target": _regex, "lora_init": _text,
    "use_dora": _flag,
    # devices
    "mesh_data": _mesh_axis, "mesh_fsdp": _mesh_axis, "mesh_tensor": _mesh_axis,
    "distributed": _flag, "coordinator_address": _text, "num_processes": _int(0),
    "process_id": _int(-1),
    # data
    "dataset_name": _nonempty, "dataset_train_split": _nonempty, "eval_dataset_name": _text,
    "dataset_test_split": _text, "prompt_column": _nonempty, "chosen_column": _nonempty,
    "rejected_column": _nonempty, "max_length": _int(2), "max_prompt_length": _int(1),
    "max_completion_length": _int(0), "add_bos": _flag,
    "tokenization": _one_of("trl", "separate"), "on_bad_row": _one_of("error", "skip"),
    "length_buckets": _buckets, "data_cache_dir": _text,
    # loss
    "loss_type": _loss, "loss_weights": _loss, "beta": _loss, "label_smoothing": _loss,
    "reference_free": _flag, "rpo_alpha": _loss, "simpo_gamma": _number(),
    "discopop_tau": _number(0, open_low=True), "precompute_ref_log_probs": _flag,
    "logprob_chunk_size": _int(0), "completion_only_head": _flag, "layout": _layout,
    "ld_alpha": _number(0, 1), "use_weighting": _flag, "token_metrics": _flag, "f_divergence_type": _loss,
    "f_alpha_divergence_coef": _number(), "sync_ref_model": _flag,
    "ref_model_mixup_alpha": _number(0, 1, open_low=True), "ref_model_sync_steps": _int(1),
    # optimization
    "optim": _optim, "learning_rate": _number(0, open_low=True), "lr_scheduler_type": _schedule,
    "warmup_steps": _int(0), "min_lr_ratio": _number(0, 1), "weight_decay": _number(0),
    "decay_biases_and_norms": _flag,
    "adam_beta1": _number(0, 1, open_high=True), "adam_beta2": _number(0, 1, open_high=True),
    "adam_epsilon": _number(0, open_low=True), "max_grad_norm": _number(0),
    "train_batch_size": _int(1), "gradient_accumulation_steps": _int(1),
    "eval_batch_size": _int(1), "num_train_epochs": _int(0), "max_steps": _int(),
    # loop
    "seed": _int(0, "a seed is a non-negative integer"), "logging_steps": _int(1),
    "eval_steps": _int(0, "0 = at the end only"), "save_steps": _int(1),
    "save_total_limit": _int(1, "a run keeps at least its last checkpoint"),
    "export_hf": _flag, "progress_bar": _flag, "sample_prompts": _int(0),
    "sample_max_new_tokens": _int(1), "sample_temperature": _number(0),
    "sample_top_k": _int(0, "0 = off"), "sample_top_p": _number(0, 1, open_low=True),
    "report_to": _report_to, "wandb_project": _nonempty,
    "allow_resume_changes": _allow_changes,
}


def check_config(config):
    """Every key, then the relations between keys. Raises ConfigError naming the key."""
    from dpo_jax.losses import LossConfig
    unchecked = sorted(set(config.keys()) - set(CHECKS))
    if unchecked:  # a key added to configs/default.py without a check here
        raise ConfigError(f"config keys {unchecked} have no check in dpo_jax/validate.py")
    for key in CHECKS:
        if key in config:
            CHECKS[key](key, config[key], config)
    try:
        LossConfig.from_config(config)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not config.max_prompt_length < config.max_length:
        raise ConfigError(f"config keys max_prompt_length={config.max_prompt_length} and "
                          f"max_length={config.max_length}: the prompt must leave room")
    if config.layout == "prefix_sharing" and config.max_completion_length <= 0:
        raise ConfigError("config key layout='prefix_sharing' needs max_completion_length > 0 "
                          "(the static window each completion is scored in)")
    if config.packing != "none" and config.max_completion_length <= 0:
        raise ConfigError(f"config key packing={config.packing!r} needs max_completion_length "
                          "> 0 (the static window each completion is scored in)")
    if config.packing != "none" and config.length_buckets:
        raise ConfigError(f"config keys packing={config.packing!r} and length_buckets exclude "
                          "each other (packed rows all have one length): drop one")
    if config.sync_ref_model:
        why = ("precompute_ref_log_probs=True fixes the reference's log-probs before training"
               if config.precompute_ref_log_probs else
               "lora_rank > 0: LoRA's reference is the base with the adapters off"
               if config.lora_rank else "")
        if not why and not LossConfig.from_config(config).needs_reference:
            why = "this loss runs without a reference (reference_free, or loss_type)"
        if why:
            raise ConfigError(f"config key sync_ref_model=True (TR-DPO moves the reference "
                              f"toward the policy) cannot apply: {why}")
    if config.max_steps <= 0 and config.num_train_epochs < 1:
        raise ConfigError(f"config keys max_steps={config.max_steps} and num_train_epochs="
                          f"{config.num_train_epochs}: the run would make no update (set "
                          "max_steps > 0 or num_train_epochs >= 1)")
    if (config.max_steps > 0 and config.lr_scheduler_type != "constant"
            and config.warmup_steps > config.max_steps):
        raise ConfigError(f"config key warmup_steps={config.warmup_steps} exceeds max_steps="
                          f"{config.max_steps}")
    if config.add_bos and config.tokenization == "trl":
        raise ConfigError("config key add_bos=True applies to tokenization='separate'; with "
                          "'trl', BOS is what the tokenizer itself adds")
    if config.use_dora and not config.lora_rank:
        raise ConfigError("config key use_dora=True needs lora_rank > 0 (DoRA adapts the base "
                          "with rank-r adapters, as LoRA)")
    if config.lora_init and not config.lora_rank:
        raise ConfigError("config key lora_init names an adapter, but lora_rank=0 (full "
                          "fine-tuning): set lora_rank to the adapter's rank")
    columns = (config.prompt_column, config.chosen_column, config.rejected_column)
    if len(set(columns)) < 3:
        raise ConfigError(f"config keys prompt_column, chosen_column, rejected_column name the "
                          f"same column: {columns}")
    if [config.mesh_data, config.mesh_fsdp, config.mesh_tensor].count(-1) > 1:
        raise ConfigError("config keys mesh_data, mesh_fsdp, mesh_tensor: at most one may be -1")


def check_backend(config):
    """What depends on the devices: call once JAX's backends are up."""
    import jax
    backend = jax.default_backend()
    for key in ("dtype", "ref_dtype"):
        if config[key] == "float16" and backend == "cpu":
            raise ConfigError(f"config key {key}='float16' does not run on the CPU (XLA's CPU "
                              "backend has no float16 kernels for these ops); use bfloat16")
