"""A run's config: the CLI's flat ``ml_collections`` keys in, typed groups out, built once.

Each idea owns its keys in a frozen dataclass next to its code, with each key's default, its
one-line meaning, its check and whether a resume must match it (``dpo_jax.keys.key``):

    model      hf.ModelConfig             tuning     tuning.TuningConfig
    mesh       sharding.MeshConfig        data       data.DataConfig
    loss       loss_config.LossConfig     reference  reference.ReferenceConfig
    layout     layouts.LayoutConfig       optim      optim.OptimConfig
    run        workdir.RunConfig          eval       evaluation.EvalConfig
    tracking   tracking.TrackingConfig

``defaults()`` is every key with its default (``configs/default.py`` returns it; a loss's own
options are keys too); ``build(config)`` checks the keys (an unknown one gets "did you mean"),
builds the groups (each checks its own keys and the rules among them) and then the rules that
cross groups, each error one line naming the key. ``resume_keys()`` is derived from the fields.
The package reads a run's settings from a ``Config`` only; each module gets the group it needs.
"""

from __future__ import annotations

import dataclasses
import difflib

import jax
import ml_collections

from dpo_jax import keys as K
from dpo_jax import losses  # noqa: F401 (registers the built-in losses before any is named)
from dpo_jax.data import DataConfig
from dpo_jax.errors import ConfigError
from dpo_jax.evaluation import EvalConfig
from dpo_jax.hf import ModelConfig
from dpo_jax.layouts import LayoutConfig
from dpo_jax.loss_config import LossConfig, registered_options
from dpo_jax.optim import OptimConfig
from dpo_jax.reference import ReferenceConfig
from dpo_jax.sharding import MeshConfig
from dpo_jax.tracking import TrackingConfig
from dpo_jax.tuning import TuningConfig
from dpo_jax.workdir import RunConfig

GROUPS = {"model": ModelConfig, "tuning": TuningConfig, "mesh": MeshConfig,
          "data": DataConfig, "loss": LossConfig, "reference": ReferenceConfig,
          "layout": LayoutConfig, "optim": OptimConfig, "run": RunConfig, "eval": EvalConfig,
          "tracking": TrackingConfig}


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
    flat: ml_collections.ConfigDict

    @property
    def scoring_window(self) -> int:
        """The static completion window of the completion-only head (0 = head on every
        position)."""
        lay = self.layout
        if lay.layout == "prefix_sharing" or lay.completion_only_head or lay.packing != "none":
            return self.data.max_completion_length
        return 0


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


def table() -> str:
    """The README's table of config keys: group, key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, cls in GROUPS.items():
        rows.append(f"| **{cls.__doc__.splitlines()[0]}** | | |")
        for f in K.fields(cls):
            if f.name == "model":
                rows.append(f"| `model` | | {f.metadata['doc']} |")
                for k, v in defaults().model.items():
                    rows.append(f"| `model.{k}` | `{v!r}` | |".replace("'", '"'))
                continue
            default = repr(K.cli_default(f)).replace("'", '"')
            rows.append(f"| `{f.name}` | `{default}` | {f.metadata['doc'].replace('|', '/')} |")
    return "\n".join(rows) + "\n"
