"""Tuning methods: how a run's params split into what trains and what stays frozen, and how the
policy and the reference are assembled from the two.

A method is a subclass of ``Tuning`` in a module of this folder that registers itself
(``@register``); the trainer, the steps, ``generate.py`` and the checkpoints only speak the
interface below and never ask which method they hold:

- ``full.py``: the policy trains whole; the reference is its own frozen copy.
- ``lora.py``: low-rank adapters wrap the matrices a regex picks (``LoRALinear``); the frozen
  base with the adapters off is the reference (one copy of the base).
- ``dora.py``: LoRA with a trained magnitude per output (Liu et al. 2024, ``use_dora``).

``for_config(cfg, family, model_cfg)`` picks the method of a run's ``TuningConfig``: the most
recently registered one whose ``applies(cfg)`` holds (full: ``lora_rank=0``; LoRA: a rank
without ``use_dora``; DoRA: with it), so a method registered later takes the configs it claims.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil

from dpo_jax import checkpoint, keys as K, quant
from dpo_jax.checkpoint import CheckpointMismatch
from dpo_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """tuning: LoRA and DoRA (dpo_jax/tuning/): the base frozen and, adapters off, the reference"""

    lora_rank: int = K.key(0, "adapter rank r; 0 = full fine-tuning",
                           K.integer(0, "0 = full fine-tuning"), resume=True)
    lora_alpha: float = K.key(16.0, "adapters scale by alpha / r (PEFT's)",
                              K.number(0, open_low=True), resume=True)
    lora_dropout: float = K.key(0.0, "dropout on the adapters' input while training",
                                K.number(0, 1, open_high=True), resume=True)
    lora_target: str = K.key("", "regex over Linear paths; \"\" = the family's (attention + "
                             "MLP)", K.regex, resume=True)
    lora_init: str = K.key("", "a PEFT adapter folder to start from; \"\" = fresh (B = 0)",
                           K.text)
    use_dora: bool = K.key(False, "DoRA: a trained magnitude per output times LoRA's direction",
                           K.flag, resume=True)
    quantize_base: str = K.key("", "QLoRA: the frozen base's Linear matrices in \"nf4\" "
                               "(bitsandbytes' 4-bit NF4, block 64), \"int8\" (its row-wise "
                               "8-bit) or \"fp8\" (transformers' fine-grained FP8 e4m3, tiles "
                               "of 128 x 128); \"\" = as loaded", K.one_of(*quant.METHODS),
                               resume=True)
    quantize_embeddings: bool = K.key(False, "with quantize_base: the embedding tables "
                                      "quantized too (a tied LM head with them); bitsandbytes "
                                      "keeps them",
                                      K.flag, resume=True)
    double_quant: bool = K.key(False, "with quantize_base=\"nf4\": its float32 scales (one per "
                               "64 weights) quantized again to 8 bits in blocks of 256, "
                               "QLoRA's double quantization (bnb_4bit_use_double_quant): "
                               "0.127 bits per weight for the scales instead of 0.5",
                               K.flag, resume=True)

    def __post_init__(self):
        K.check_fields(self)
        if self.use_dora and not self.lora_rank:
            raise ConfigError("config key use_dora=True needs lora_rank > 0 (DoRA adapts the "
                              "base with rank-r adapters, as LoRA)")
        if self.quantize_base and not self.lora_rank:
            raise ConfigError(f"config key quantize_base={self.quantize_base!r} quantizes the "
                              "frozen base of LoRA or DoRA, and lora_rank=0 (full fine-tuning "
                              "trains every weight): set lora_rank")
        if self.double_quant and self.quantize_base != "nf4":
            raise ConfigError("config key double_quant=True quantizes NF4's block scales, and "
                              f"quantize_base={self.quantize_base!r}: set quantize_base=\"nf4\"")
        if self.quantize_embeddings and not self.quantize_base:
            raise ConfigError("config key quantize_embeddings=True quantizes the embedding "
                              "tables of a quantized base: set quantize_base=\"nf4\"")
        if self.lora_init and not self.lora_rank:
            raise ConfigError("config key lora_init names an adapter, but lora_rank=0 (full "
                              "fine-tuning): set lora_rank to the adapter's rank")


@dataclasses.dataclass
class Parts:
    """What ``Tuning.split`` gives the trainer to place and train."""

    trainable: dict      # the params the optimizer updates (host or device arrays)
    rules: tuple         # sharding rules of the trainable params
    decay_mask: dict     # where weight decay applies (optim.build)
    frozen: dict | None  # the frozen params, placed; None: ``frozen_copy`` makes them later


class Tuning(abc.ABC):
    """The tuning contract (see the module docstring)."""

    name: str = ""
    # once the reference's log-probs are precomputed, the frozen params can be dropped
    frees_frozen_after_precompute: bool = False
    # whether the model's own matrices get weight gradients (full tuning); adapters leave them
    # frozen, so the backward pass costs one forward less (goodput.step_flops)
    trains_base_weights: bool = False

    def __init__(self, family, model_cfg, ref_dtype: str = ""):
        self.family, self.model_cfg = family, model_cfg
        self.ref_dtype = ref_dtype  # the frozen params' dtype in memory ("" = float32)

    @classmethod
    @abc.abstractmethod
    def applies(cls, cfg: TuningConfig) -> bool:
        """Whether a run's tuning keys ask for this method."""

    @classmethod
    def from_config(cls, cfg: TuningConfig, family, model_cfg, *,
                    ref_dtype: str = "") -> "Tuning":
        return cls(family, model_cfg, ref_dtype)

    # ---- inside the jitted steps
    @abc.abstractmethod
    def model(self, trainable, frozen, rng=None):
        """The policy (an NNX module); ``rng`` feeds its training randomness (dropout)."""

    @abc.abstractmethod
    def reference(self, trainable, frozen):
        """The reference model."""

    # ---- setup
    @abc.abstractmethod
    def split(self, mesh, params, *, seed: int) -> Parts:
        """The trainable / frozen split of the initial params (``params`` as loaded; ``seed``
        for what the method initializes)."""

    def frozen_copy(self, state, state_sh) -> dict:
        """The frozen params when ``split`` left them to be made from the placed train state."""
        raise NotImplementedError

    def record(self) -> dict | None:
        """What a checkpoint of this method must match on resume (None: nothing)."""
        return None

    def check_record(self, record: dict, where) -> None:
        """Raises ``CheckpointMismatch`` where a checkpoint's record was written by another
        method or setting (records before this package kept LoRA's under ``lora``)."""
        have = record.get("tuning", record.get("lora"))
        if have is not None:
            have = {"method": "lora", **have}  # LoRA's records before DoRA named no method
        want = self.record()
        if have == want:
            return
        if have is None or want is None or have.get("method", "lora") != want.get("method"):
            raise CheckpointMismatch(f"{where} holds {_describe(have)}, and this run trains "
                                     f"{_describe(want)}; use a fresh --workdir or the matching "
                                     "config")
        diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want))
                if have.get(k) != want.get(k) and k != "base"}
        if not diff:
            raise CheckpointMismatch(
                f"{where} holds adapters of another base model: the base weights' checksum "
                "differs (config key model_name_or_path, or its files changed)")
        raise CheckpointMismatch(f"{where} holds a checkpoint of another {want['method']} "
                                 f"setting (saved vs this config: {diff}); use a fresh --workdir "
                                 "or the matching config")

    # ---- export and restore
    @abc.abstractmethod
    def merged_params(self, trainable: dict, frozen) -> dict:
        """The policy as one plain params dict of the family (host numpy): the HF export.
        ``trainable``: host arrays; ``frozen``: as placed. Called on every process."""

    def export_dtype(self) -> str:
        """The dtype of the merged HF export: float32, the trained params' own."""
        return "float32"

    def export(self, workdir, trainable: dict, *, base_name: str) -> None:
        """Writes what this method exports besides the merged HF folder (an adapter), from the
        host ``trainable`` params (the lead process only)."""

    @abc.abstractmethod
    def trainable_template(self, base_params: dict) -> dict:
        """Arrays (or shapes) with the structure of the trainable params, for a restore."""

    def restore_policy(self, ckpt, step: int, base_params: dict, expect: dict):
        """The policy of a checkpoint, on ``base_params`` (generate.py): no optimizer built."""
        template = checkpoint.abstract_like(self.trainable_template(base_params))
        trainable = ckpt.restore_params(step, template, expect=expect,
                                        check=self.check_record)
        return self.model(trainable, base_params)


def _describe(record: dict | None) -> str:
    if record is None:
        return "full fine-tuning (lora_rank=0)"
    method = record.get("method", "lora")
    return f"{method.upper()} adapters (lora_rank={record.get('rank')})"


METHODS: list[type[Tuning]] = []


def register(cls: type[Tuning]) -> type[Tuning]:
    """Class decorator: adds a method (a later registration takes precedence for the configs
    its ``applies`` claims)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[:] = [m for m in METHODS if m.name != cls.name] + [cls]
    return cls


def unregister(name: str) -> None:
    METHODS[:] = [m for m in METHODS if m.name != name]


def method_for(cfg: TuningConfig) -> type[Tuning]:
    for cls in reversed(METHODS):
        if cls.applies(cfg):
            return cls
    raise ValueError("no tuning method applies to this config")


def for_config(cfg: TuningConfig, family, model_cfg, *, ref_dtype: str = "") -> Tuning:
    """The tuning a run's keys ask for, built for this model."""
    return method_for(cfg).from_config(cfg, family, model_cfg, ref_dtype=ref_dtype)


def _discover():
    """Imports every module of this folder: each registers its method."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


_discover()
