"""A run's config: the CLI's flat ``ml_collections`` keys in, typed groups out, built once.

Each idea owns its keys in a frozen dataclass next to its code, with each key's default, its
one-line meaning, its check and whether a resume must match it (``dpo_jax.keys.key``):

    model      hf.ModelConfig             tuning     tuning.TuningConfig
    mesh       sharding.MeshConfig        data       data.DataConfig
    loss       loss_config.LossConfig     reference  reference.ReferenceConfig
    layout     layouts.LayoutConfig       optim      optim.OptimConfig
    run        workdir.RunConfig          eval       evaluation.EvalConfig
    tracking   tracking.TrackingConfig    online     online.OnlineConfig

``defaults()`` is every key with its default (``configs/default.py`` returns it; a loss's own
options are keys too); ``build(config)`` checks the keys (an unknown one gets "did you mean"),
builds the groups (each checks its own keys and the rules among them) and then the rules that
cross groups, each error one line naming the key. ``resume_keys()`` is derived from the fields.
The package reads a run's settings from a ``Config`` only; each module gets the group it needs.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re

import jax
import ml_collections
from ml_collections import config_dict

from dpo_jax import keys as K
from dpo_jax import losses  # noqa: F401 (registers the built-in losses before any is named)
from dpo_jax.data import DataConfig
from dpo_jax.errors import ConfigError
from dpo_jax.evaluation import EvalConfig
from dpo_jax.hf import ModelConfig
from dpo_jax.layouts import LayoutConfig
from dpo_jax.loss_config import LossConfig, registered_options
from dpo_jax.online import OnlineConfig
from dpo_jax.optim import OptimConfig
from dpo_jax.reference import ReferenceConfig
from dpo_jax.sharding import MeshConfig
from dpo_jax.tracking import TrackingConfig
from dpo_jax.tuning import TuningConfig
from dpo_jax.workdir import RunConfig

log = logging.getLogger(__name__)

GROUPS = {"model": ModelConfig, "tuning": TuningConfig, "mesh": MeshConfig,
          "data": DataConfig, "loss": LossConfig, "reference": ReferenceConfig,
          "layout": LayoutConfig, "optim": OptimConfig, "run": RunConfig, "eval": EvalConfig,
          "tracking": TrackingConfig, "online": OnlineConfig}


@dataclasses.dataclass(frozen=True)
class Config:
    """A run's settings: one typed group per idea, and the flat keys as given (``flat``: what
    config.json and the trackers record)."""

    model: ModelConfig
    tuning: TuningConfig
    mesh: MeshConfig
    data: DataConfig
    loss: LossConfig
    reference: ReferenceConfig
    layout: LayoutConfig
    optim: OptimConfig
    run: RunConfig
    eval: EvalConfig
    tracking: TrackingConfig
    online: OnlineConfig
    flat: ml_collections.ConfigDict

    @property
    def scoring_window(self) -> int:
        """The static completion window of the completion-only head (0 = head on every
        position)."""
        lay = self.layout
        if lay.layout == "prefix_sharing" or lay.completion_only_head or lay.packing != "none":
            return self.data.max_completion_length
        return 0


def _lora_targets(v: str, c) -> dict:
    """TRL's list of module names -> our regex over Linear paths."""
    names = [n.strip() for n in str(v).split(",") if n.strip()]
    if names == ["all-linear"]:
        return {"lora_target": r".*"}
    return {"lora_target": r".*\.(" + "|".join(map(re.escape, names)) + ")"}


def _per_device(key: str):
    def convert(v, c) -> dict:
        if c.distributed:
            raise ConfigError(f"config key per_device_{key} (TRL's name) needs the device count, "
                              f"which a multi-host run knows only later: set {key} (pairs per "
                              "micro-batch over all devices and processes) instead")
        sizes = [c.mesh_data, c.mesh_fsdp, c.mesh_expert, c.mesh_context, c.mesh_tensor]
        if -1 in sizes:
            known = [s for s in sizes if s != -1]
            sizes[sizes.index(-1)] = jax.device_count() // max(1, math.prod(known))
        return {key: int(v) * sizes[0] * sizes[1] * sizes[2]}  # the data-parallel devices
    return convert


def _refuse(message: str):
    def convert(v, c) -> dict:
        raise ConfigError(message.format(v=v))
    return convert


# TRL's names (DPOConfig, TrainingArguments, ModelConfig) that are not ours: name -> (type, the
# keys of ours it sets, given its value and the config). Set, each is resolved once and logged;
# one that has no counterpart fails with one line naming ours.
TRL_NAMES = {
    "bf16": (bool, lambda v, c: {"dtype": "bfloat16"} if v else {}),
    "torch_dtype": (str, lambda v, c: {"dtype": v}),
    "gradient_checkpointing": (bool, lambda v, c: {"remat": bool(v)}),
    "lora_r": (int, lambda v, c: {"lora_rank": int(v)}),
    "use_peft": (bool, lambda v, c: {"lora_rank": c.lora_rank or 16} if v else {}),
    "lora_target_modules": (str, _lora_targets),
    "padding_free": (bool, lambda v, c: {"packing": "exact"} if v else {}),
    "per_device_train_batch_size": (int, _per_device("train_batch_size")),
    "per_device_eval_batch_size": (int, _per_device("eval_batch_size")),
    "disable_dropout": (bool, lambda v, c: {} if v else _refuse(
        "config key disable_dropout=False (TRL's name): the models here run without dropout "
        "(lora_dropout is the adapters')")(v, c)),
    "truncation_mode": (str, lambda v, c: {} if v == "keep_start" else _refuse(
        "config key truncation_mode={v!r} (TRL's name): only keep_start is offered (TRL 1.16 "
        "deprecates keep_end)")(v, c)),
    "output_dir": (str, _refuse("config key output_dir (TRL's name): pass --workdir {v}")),
    "precompute_ref_batch_size": (int, _refuse(
        "config key precompute_ref_batch_size (TRL's name): reference log-probs are "
        "precomputed in batches of eval_batch_size; set that")),
    "warmup_ratio": (float, _refuse("config key warmup_ratio (TRL's name): set warmup_steps "
                                    "(updates) instead")),
    "load_in_4bit": (bool, lambda v, c: {"quantize_base": "nf4"} if v else {}),
    "bnb_4bit_quant_type": (str, lambda v, c: {} if v == "nf4" else _refuse(
        "config key bnb_4bit_quant_type={v!r} (TRL's name): the 4-bit base is NF4 only "
        "(quantize_base=\"nf4\")")(v, c)),
    "use_bnb_nested_quant": (bool, lambda v, c: {"double_quant": True} if v else {}),
    "load_in_8bit": (bool, lambda v, c: {"quantize_base": "int8"} if v else {}),
}
# TRL's spellings of values of our keys
TRL_VALUES = {"optim": {"adamw_torch": "adamw", "adamw_torch_fused": "adamw",
                        "adamw_hf": "adamw", "rmsprop_torch": "rmsprop"}}


# Our keys that TRL 1.16 spells the same (DPOConfig / TrainingArguments / ModelConfig), and
# where our default differs from TRL's, why.
TRL_SAME = {
    "model_name_or_path", "dtype", "lora_alpha", "lora_dropout", "use_dora", "beta",
    "label_smoothing", "loss_type", "loss_weights", "ld_alpha", "use_weighting",
    "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "sync_ref_model",
    "ref_model_mixup_alpha", "ref_model_sync_steps", "precompute_ref_log_probs", "max_length",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "gradient_accumulation_steps",
    "num_train_epochs", "max_steps", "seed", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "report_to", "optim"}
TRL_DIFFERS = {
    "max_grad_norm": ("1.0", "the DPO paper's code clips at 10"),
    "warmup_steps": ("0", "the paper warms up over 150 updates"),
    "num_train_epochs": ("3", "the paper trains one epoch"),
    "max_length": ("1024", "the paper's HH setting; GPT-2's context is 1024 for prompt + one"),
    "lora_alpha": ("32", "PEFT's LoraConfig default is 8; 16 = 2 x a common rank 8"),
    "lora_dropout": ("0.05", "exact step-0 equality of policy and reference, and resume"),
    "save_steps": ("500", "a small run still leaves checkpoints"),
    "save_total_limit": ("None: all", "bounded disk"),
    "seed": ("42", ""),
    "eval_steps": ("None: logging_steps", ""),
    "report_to": ("none", "metrics.jsonl is always written besides"),
    "optim": ("adamw_torch_fused", "the same AdamW; TRL's spellings are accepted"),
}


def resolve_trl_names(flat) -> ml_collections.ConfigDict:
    """``flat`` with TRL's names turned into ours (each logged once) and reset to None."""
    flat = ml_collections.ConfigDict(flat.to_dict())
    for name, (_, convert) in TRL_NAMES.items():
        value = flat.get(name)
        if value is None:
            continue
        ours = convert(value, flat)
        flat[name] = None
        for k, v in ours.items():
            flat[k] = v
        log.info("config key %s=%r (TRL's name): %s", name, value,
                 ", ".join(f"{k}={v!r}" for k, v in ours.items()) or "already so here")
    for key, spellings in TRL_VALUES.items():
        if flat[key] in spellings:
            log.info("config key %s=%r (TRL's spelling): %r", key, flat[key], spellings[flat[key]])
            flat[key] = spellings[flat[key]]
    return flat


def _key_fields():
    """(group name, field) of every key, in the order of the groups."""
    return [(name, f) for name, cls in GROUPS.items() for f in K.fields(cls)]


def defaults() -> ml_collections.ConfigDict:
    """Every config key with its default, as a config file spells it."""
    c = ml_collections.ConfigDict()
    for _, f in _key_fields():
        value = K.cli_default(f) if f.default_factory is dataclasses.MISSING else \
            f.default_factory()
        c[f.name] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    for name, option in registered_options().items():
        c[name] = option.default
    for name, (kind, _) in TRL_NAMES.items():
        c[name] = config_dict.placeholder(kind)
    return c


def resume_keys() -> tuple[str, ...]:
    """The keys a resume must keep (they shape the training trajectory)."""
    return tuple(f.name for _, f in _key_fields() if f.metadata["resume"]) + \
        tuple(registered_options())


def did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def build(config) -> Config:
    """The typed groups of a flat config (a ConfigDict or a mapping of keys), checked."""
    flat = config if isinstance(config, ml_collections.ConfigDict) else \
        ml_collections.ConfigDict(dict(config))
    valid = set(defaults().keys())
    unknown = sorted(set(flat.keys()) - valid)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}{did_you_mean(unknown[0], valid)}")
    missing = sorted(valid - set(flat.keys()))
    if missing:
        flat = _with_defaults(flat)
    flat = resolve_trl_names(flat)
    groups = {}
    for name, cls in GROUPS.items():
        values = {f.name: _plain(flat[f.name]) for f in K.fields(cls)}
        try:
            if cls is LossConfig:
                values.update({k: flat[k] for k in registered_options()})
                groups[name] = LossConfig.from_config(values)
            else:
                groups[name] = cls(**values)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e) if str(e).startswith("config key") else
                              f"config key {_guess_key(str(e), cls)}: {e}") from None
    cfg = Config(**groups, flat=flat)
    _check_across(cfg)
    if "discopop" in cfg.loss.loss_type:
        log.warning("loss_type discopop: from a fresh start (policy = reference, z = 0) its "
                    "gradient can favour the rejected completions (TRL's formula too); watch "
                    "rewards/accuracies in the first steps")
    return cfg


def _with_defaults(flat):
    """A config written before some keys existed (an older workdir's config.json), completed
    with their defaults."""
    full = defaults()
    full.update(flat)
    return full


def _plain(value):
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _guess_key(message: str, cls) -> str:
    for f in K.fields(cls):
        if message.startswith(f.name) or f" {f.name} " in f" {message} ":
            return f.name
    return cls.__doc__.splitlines()[0]


def _check_across(cfg: Config):
    """The rules between keys of different groups."""
    data, lay = cfg.data, cfg.layout
    if not data.dataset_name.strip() and not cfg.online.online_rounds:
        raise ConfigError("config key dataset_name is empty")
    longest, what = data.max_length, f"max_length={data.max_length}"
    if lay.layout == "prefix_sharing":  # a row holds the prompt and both completions
        longest += data.max_completion_length
        what += f" + max_completion_length={data.max_completion_length} (prefix_sharing)"
    bad = [b for b in data.length_buckets if not int(b) <= longest]
    if bad:
        raise ConfigError(f"config key length_buckets={tuple(data.length_buckets)!r}: every "
                          f"length must lie in (1, {what}]; {bad} do not")
    if lay.layout == "prefix_sharing" and data.max_completion_length <= 0:
        raise ConfigError("config key layout='prefix_sharing' needs max_completion_length > 0 "
                          "(the static window each completion is scored in)")
    if lay.packing != "none" and data.max_completion_length <= 0:
        raise ConfigError(f"config key packing={lay.packing!r} needs max_completion_length "
                          "> 0 (the static window each completion is scored in)")
    if lay.packing != "none" and data.length_buckets:
        raise ConfigError(f"config keys packing={lay.packing!r} and length_buckets exclude "
                          "each other (packed rows all have one length): drop one")
    ref = cfg.reference
    if ref.sync_ref_model:
        why = ("precompute_ref_log_probs=True fixes the reference's log-probs before training"
               if ref.precompute_ref_log_probs else
               "lora_rank > 0: LoRA's reference is the base with the adapters off"
               if cfg.tuning.lora_rank else
               "this loss runs without a reference (reference_free, or loss_type)"
               if not cfg.loss.needs_reference else "")
        if why:
            raise ConfigError(f"config key sync_ref_model=True (TR-DPO moves the reference "
                              f"toward the policy) cannot apply: {why}")
    allowed = [k.strip() for k in cfg.run.allow_resume_changes.split(",") if k.strip()]
    unknown = [k for k in allowed if k != "all" and k not in resume_keys()]
    if unknown:
        raise ConfigError(f"config key allow_resume_changes: {unknown} are not keys that a "
                          f"resume checks; they are {', '.join(resume_keys())} (or 'all')")


def check_backend(cfg: Config):
    """What depends on the devices: call once JAX's backends are up."""
    backend = jax.default_backend()
    for key in ("dtype", "ref_dtype"):
        if getattr(cfg.model, key) == "float16" and backend == "cpu":
            raise ConfigError(f"config key {key}='float16' does not run on the CPU (XLA's CPU "
                              "backend has no float16 kernels for these ops); use bfloat16")


def _trl_column(name: str) -> str:
    if name in TRL_DIFFERS:
        trl, why = TRL_DIFFERS[name]
        return f"same name; TRL's default {trl}" + (f" ({why})" if why else "")
    return "same" if name in TRL_SAME else ""


def table() -> str:
    """The README's table of config keys: group, key, default, meaning, TRL's name; then TRL's
    names that are not ours, and what each becomes."""
    rows = ["| key | default | meaning | TRL 1.16 |", "|---|---|---|---|"]
    for name, cls in GROUPS.items():
        rows.append(f"| **{cls.__doc__.splitlines()[0]}** | | | |")
        for f in K.fields(cls):
            if f.name == "model":
                rows.append(f"| `model` | | {f.metadata['doc']} | |")
                for k, v in defaults().model.items():
                    rows.append(f"| `model.{k}` | `{v!r}` | | |".replace("'", '"'))
                continue
            default = repr(K.cli_default(f)).replace("'", '"')
            rows.append(f"| `{f.name}` | `{default}` | {f.metadata['doc'].replace('|', '/')} "
                        f"| {_trl_column(f.name)} |")
    rows.append("| **TRL's names (resolved when the config is read, logged once)** | | | |")
    for name, text in TRL_TABLE.items():
        rows.append(f"| `{name}` | `None` | {text} | TRL's |")
    return "\n".join(rows) + "\n"


TRL_TABLE = {
    "bf16": "True: dtype=\"bfloat16\"",
    "torch_dtype": "dtype",
    "gradient_checkpointing": "remat",
    "lora_r": "lora_rank",
    "use_peft": "True: lora_rank=16 unless lora_rank is set",
    "lora_target_modules": "module names, comma-separated (or all-linear): lora_target, a regex",
    "padding_free": "True: packing=\"exact\" (the same pairs per update, packed rows)",
    "per_device_train_batch_size": "train_batch_size = this x the data-parallel devices (one "
                                   "process; set train_batch_size on several)",
    "per_device_eval_batch_size": "eval_batch_size, the same way",
    "disable_dropout": "True: already so (the models run without dropout); False: an error",
    "truncation_mode": "keep_start: already so; keep_end: an error",
    "output_dir": "an error: pass --workdir",
    "precompute_ref_batch_size": "an error: precomputing uses eval_batch_size",
    "warmup_ratio": "an error: set warmup_steps",
    "load_in_4bit": "True: quantize_base=\"nf4\" (QLoRA)",
    "bnb_4bit_quant_type": "nf4: already so; fp4: an error",
    "use_bnb_nested_quant": "True: double_quant=True (NF4's scales in 8 bits)",
    "load_in_8bit": "True: quantize_base=\"int8\"",
}
