"""Model families behind one contract, found by Hugging Face ``model_type``.

A family is a folder (``models/gpt2/``, ``models/llama/``): ``model.py`` holds the Flax NNX
module in the family's own parameter names, ``params.py`` its Hugging Face side, and both meet
the contract below. Nothing outside ``models/`` knows a family's field or parameter names: the
trainer, log-probs, sampling, sharding, checkpoints and HF import/export ask the family.

The module (``family.model_cls(config, rngs=...)``) subclasses ``trunk.CausalLM``, which owns
the trunk plumbing once (``hidden_states``, ``decode``, the KV cache, ``lm_head``, ``__call__``
and the output hook ``logits_fn``); a family supplies its embedding, stacked blocks, final norm
and head (see ``trunk.py``). Its ``config`` is a frozen dataclass of architecture fields followed
by the compute options of ``common.ComputeOptions`` (dtype, remat, remat_policy, attention), with
``vocab_size``, ``bos_token_id``, ``eos_token_id``, ``n_layers``, ``n_heads``, ``n_kv_heads``,
``head_size``, ``max_positions``, ``length_limits()`` (the sequence-length limits, by config
field name) and ``tensor_parallel_dims()`` (the sizes the tensor axis splits, by config field
name).

The family (``Family``, below): HF ``config.json`` <-> config, the HF tensor-name table for
import and export, the sharding rules, and LoRA's default target. Each folder's ``FAMILY`` is
registered when this package is imported (``register`` adds one from elsewhere);
``family_for(model_type)`` finds it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One row of a family's HF name table: one HF tensor and the param(s) of ours it holds.

    Transforms, applied per layer on import and undone on export: ``transpose`` (HF's
    nn.Linear stores (out, in); ours is (in, out)); several paths in ``ours`` are fused in the
    checkpoint, concatenated along ``axis`` of HF's layout (after the transpose): a fused
    ``qkv_proj`` or ``gate_up_proj`` split into our separate matrices on import and fused again
    on export; ``row_order(n)`` permutes the rows (axis 0 of HF's layout, after any fusing):
    HF's row i is our row ``row_order(n)[i]`` (a rotary layout of its own, say). A norm stored
    as (w - 1), as Gemma's, stays as stored: the module adds the one (an exact round trip,
    where storing w + 1 would round)."""

    ours: str | tuple[str, ...]  # our parameter path(s), e.g. "layers.self_attn.q_proj.weight"
    hf: str                 # the HF key; "{i}" stands for the layer index of a stacked param
    transpose: bool = False
    axis: int = 0           # where fused params are concatenated, in HF's layout
    row_order: Callable[[int], np.ndarray] | None = None  # HF row i = our row order[i]
    experts: int = 0        # >0: our params carry an expert axis after the layer axis, and
    #                         "{j}" in ``hf`` stands for the expert (one HF tensor per expert)
    layers: tuple[int, ...] | None = None  # the HF layer index of each entry of our layer
    #                         axis, where a family keeps two stacks (None: 0, 1, ..., n - 1)

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        """The HF layer indices ``{i}`` takes, in the order of our layer axis (one, 0, for a
        param that is not stacked)."""
        if not self.stacked:
            return (0,)
        return tuple(range(n_layers)) if self.layers is None else self.layers

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)

    def hf_shape(self, shapes: list[tuple]) -> tuple:
        """The HF tensor's shape (one layer) from our params' (one layer each)."""
        shapes = [s[::-1] if self.transpose else s for s in shapes]
        if len(shapes) == 1:
            return tuple(shapes[0])
        out = list(shapes[0])
        out[self.axis] = sum(s[self.axis] for s in shapes)
        return tuple(out)

    def to_hf(self, parts: list):
        """Our arrays (one layer each) -> the HF tensor."""
        parts = [p.T if self.transpose else p for p in parts]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.axis)
        return out if self.row_order is None else out[self.row_order(len(out))]

    def to_ours(self, a, shapes: list[tuple]) -> list:
        """The HF tensor (one layer) -> our arrays, split where fused."""
        if self.row_order is not None:
            a = a[np.argsort(self.row_order(len(a)))]
        if len(shapes) == 1:
            parts = [a]
        else:
            sizes = [(s[::-1] if self.transpose else s)[self.axis] for s in shapes]
            parts = np.split(a, np.cumsum(sizes)[:-1], axis=self.axis)
        return [p.T if self.transpose else p for p in parts]


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


def _discover():
    """Registers the ``FAMILY`` of every subpackage of this folder: a new family is a folder."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.ispkg:
            family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
            if family is not None:
                register(family)


_discover()
