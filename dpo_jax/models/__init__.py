"""Model families behind one contract, found by Hugging Face ``model_type``.

A family is a folder (``models/gpt2/``, ``models/llama/``): ``model.py`` holds the Flax NNX
module in the family's own parameter names, ``params.py`` its Hugging Face side, and both meet
the contract below. Nothing outside ``models/`` knows a family's field or parameter names: the
trainer, log-probs, sampling, sharding, checkpoints and HF import/export ask the family.

The module (``family.model_cls(config, rngs=...)``):
  ``hidden_states(input_ids, attention_mask=None, position_ids=None, *, attn_mask=None)``
      the trunk's final hidden states (B, T, C) in the compute dtype. ``attention_mask`` (B, T)
      marks real tokens; ``position_ids`` default to counting them; ``attn_mask`` (B, T, T)
      replaces the causal-and-padding mask (layouts pass their own: prefix sharing, packing).
  ``head_weight()``  the LM head's (V, C) matrix, tied to the embedding or not; log-prob code
      runs the head itself, in chunks and only where it scores (``dpo_jax.logprobs``).
  ``lm_head(hidden)`` float32 logits; ``__call__`` = ``lm_head(hidden_states(...))``.
  ``init_cache(batch, length)`` / ``decode(input_ids, position_ids, key_mask, cache, index)``
      KV-cache generation (``dpo_jax.sampling``).
  ``config``: the family config, a frozen dataclass of architecture fields followed by the
      compute options of ``common.ComputeOptions`` (dtype, remat, remat_policy, attention), with
      ``vocab_size``, ``bos_token_id``, ``eos_token_id``, ``n_layers``, ``max_positions``,
      ``length_limits()`` (the sequence-length limits, by config field name) and
      ``tensor_parallel_dims()`` (the sizes the tensor axis splits, by config field name).

The family (``Family``, below): HF ``config.json`` <-> config, the HF tensor-name table for
import and export, the sharding rules, and LoRA's default target. ``register`` adds one;
``family_for(model_type)`` finds it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One row of a family's HF name table."""

    ours: str               # our parameter path, e.g. "layers.self_attn.q_proj.weight"
    hf: str                 # the HF key; "{i}" stands for the layer index of a stacked param
    transpose: bool = False  # HF's nn.Linear stores (out, in); ours is (in, out)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def _same_key(key: str) -> str:
    return key


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]   # the HF model_type values this family reads
    config_cls: type
    model_cls: type
    # config.json dict -> config (compute options as keywords); ValueError names a bad field
    config_from_hf: Callable[..., object]
    config_to_hf: Callable[[object], dict]  # config -> config.json fields
    hf_tensors: Callable[[object], list]    # config -> [HFTensor], every param once
    rules: tuple                   # sharding: ordered (regex on param path, PartitionSpec)
    lora_target: str               # LoRA's default: regex over param paths of matrices
    hf_key: Callable[[str], str] = _same_key  # the canonical spelling of a checkpoint key
    hf_ignored: tuple[str, ...] = ()  # regexes of checkpoint keys that are fine to ignore


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds a family under each of its HF model_types (a later one replaces an earlier)."""
    for t in family.model_types:
        FAMILIES[t] = family
    return family


def family_for(model_type) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type is {model_type!r}, which is not supported; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def family_of(cfg) -> Family:
    """The family of a config instance (a registered family's config class)."""
    for fam in FAMILIES.values():
        if type(cfg) is fam.config_cls:
            return fam
    raise ValueError(f"{type(cfg).__name__} is not the config of a registered model family")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'h': {'ln_1': {'weight': x}}} -> {'h.ln_1.weight': x} (dotted paths, HF's spelling)."""
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def unflatten_like(template: dict, flat: dict, prefix: str = "") -> dict:
    """The inverse of ``flatten`` along the structure of ``template``."""
    return {k: (unflatten_like(v, flat, f"{prefix}{k}.") if isinstance(v, dict)
                else flat[f"{prefix}{k}"]) for k, v in template.items()}


def _register_builtin():
    from dpo_jax.models import gpt2, llama
    register(gpt2.FAMILY)
    register(llama.FAMILY)


_register_builtin()
