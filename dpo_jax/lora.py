"""LoRA DPO: adapters on the matrices a regex picks; the frozen base, adapters off, is the reference.

``lora_rank`` > 0 adds to every ``Linear`` whose path fully matches ``lora_target`` (each family
has a default: the attention and MLP projections) the adapters ``lora_a`` (in, r) and ``lora_b``
(r, out) as ``nnx.LoRAParam`` variables, with the layer axis of the stacked layers in front; the
layer then computes ``x @ W + (alpha / r) * dropout(x) @ A @ B`` (``models.common.Linear``). B
starts at zero, so at step 0 the policy is the base exactly. A is initialized as PEFT does
(kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(in)).

``LoRATuning`` is the trainable / frozen split of ``steps.py``: trainable = the adapters (the only
gradient and optimizer state), frozen = the base params, which with the adapters switched off
are the reference: one copy of the base in memory, no second model. Exports: ``merged_params``
(W + scale * A @ B, an ordinary HF model) and ``save_peft`` / ``load_peft`` (PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained``
loads on top of the HF base model, and which can start a run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from dpo_jax import hub, models
from dpo_jax.errors import ConfigError
from dpo_jax.models import common

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class LoRAKey(nnx.Variable):
    """Per-layer PRNG key data of LoRA dropout (set by the step; never trained or saved)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float
    target: str  # regex over the paths of Linear layers ("layers.self_attn.q_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config, family) -> "LoRAConfig":
        return cls(rank=config.lora_rank, alpha=float(config.lora_alpha),
                   dropout=float(config.lora_dropout),
                   target=config.lora_target or family.lora_target)

    def record(self) -> dict:
        return dataclasses.asdict(self)


def linear_paths(model) -> list[str]:
    """The dotted paths of every Linear layer of a module (its adaptable matrices)."""
    return [".".join(map(str, path)) for path, node in nnx.iter_graph(model)
            if isinstance(node, common.Linear)]


def matched_paths(model, cfg: LoRAConfig) -> list[str]:
    """The Linear layers ``cfg.target`` adapts; none is an error naming those it could."""
    matched = [p for p in linear_paths(model) if re.fullmatch(cfg.target, p)]
    if not matched:
        raise ConfigError(f"config key lora_target={cfg.target!r} matches no matrix of this "
                          f"model; its matrices are: {', '.join(linear_paths(model))}")
    return matched


def add_adapters(model, cfg: LoRAConfig, rngs: nnx.Rngs | None, *, dropout: bool = True):
    """Adds adapters in place to the matched Linear layers; returns their paths. With
    ``rngs`` None the adapters are zeros (a structure to restore or load into)."""
    matched = matched_paths(model, cfg)
    for path in matched:
        layer = _module_at(model, path)
        w = layer.weight[...]
        lead, (n_in, n_out) = w.shape[:-2], w.shape[-2:]
        if rngs is None:
            a = jnp.zeros((*lead, n_in, cfg.rank), jnp.float32)
        else:  # PEFT's kaiming_uniform_(a=sqrt(5)) on lora_A: bound 1 / sqrt(fan_in)
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(rngs.params(), (*lead, n_in, cfg.rank), jnp.float32,
                                   -bound, bound)
        layer.lora_a = nnx.data(nnx.LoRAParam(a))
        layer.lora_b = nnx.data(nnx.LoRAParam(jnp.zeros((*lead, cfg.rank, n_out), jnp.float32)))
        layer.lora_scale = cfg.scale
        if dropout and cfg.dropout > 0:
            layer.lora_dropout = cfg.dropout
            layer.lora_key = nnx.data(LoRAKey(jnp.zeros((*lead, 2), jnp.uint32)))
    return matched


def _module_at(model, path: str):
    node = model
    for part in path.split("."):
        node = getattr(node, part)
    return node


class LoRATuning:
    """steps.py's tuning for LoRA: trainable = adapters, frozen = the base (= the reference)."""

    def __init__(self, family, model_cfg, cfg: LoRAConfig):
        self.family, self.model_cfg, self.cfg = family, model_cfg, cfg
        # checked here, outside any trace, so a bad target is a plain one-line error
        matched_paths(common.abstract(family.model_cls, model_cfg), cfg)

        def adapted(dropout):
            m = family.model_cls(model_cfg, rngs=nnx.Rngs(0))
            self.paths = add_adapters(m, cfg, None, dropout=dropout)
            return m

        self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: adapted(False)))
        train = nnx.eval_shape(lambda: adapted(True))
        self.train_graphdef = nnx.graphdef(train)
        self.key_template = nnx.to_pure_dict(nnx.state(train, LoRAKey))
        self.base_graphdef = nnx.graphdef(common.abstract(family.model_cls, model_cfg))

    # ---- the tuning contract (steps.py)
    frees_frozen_after_precompute = False  # the base is also the policy's

    def model(self, trainable, frozen, rng=None):
        if rng is not None and self.cfg.dropout > 0:  # a key per adapted layer (and layer)
            leaves, tree = jax.tree.flatten(self.key_template)
            keys = jax.tree.unflatten(tree, [
                jax.random.key_data(jax.random.split(jax.random.fold_in(rng, i),
                                                     leaf.shape[:-1] or ()))
                if leaf.ndim > 1 else jax.random.key_data(jax.random.fold_in(rng, i))
                for i, leaf in enumerate(leaves)])
            return nnx.merge(self.train_graphdef, trainable, frozen, keys)
        return nnx.merge(self.graphdef, trainable, frozen)

    def reference(self, trainable, frozen):
        return nnx.merge(self.base_graphdef, frozen)

    # ---- params
    def init_adapters(self, seed: int):
        """Fresh adapters (a pure dict): A random, B zero."""
        def init():
            m = self.family.model_cls(self.model_cfg, rngs=nnx.Rngs(0))
            add_adapters(m, self.cfg, nnx.Rngs(seed + 1), dropout=False)
            return nnx.to_pure_dict(nnx.state(m, nnx.LoRAParam))
        return init

    def rules(self, base_rules) -> list:
        """Sharding rules of the adapters, from their base matrix's: A keeps the input's
        split and B the output's, the rank axis whole."""
        out = []
        for path in self.paths:
            spec = _spec_of(f"{path}.weight", base_rules)
            nd = len(spec)
            out.append((re.escape(f"{path}.lora_a"), P(*spec[:nd - 1], None)))
            out.append((re.escape(f"{path}.lora_b"), P(*spec[:nd - 2], None, spec[nd - 1])))
        return out

    def merged_params(self, trainable: dict, frozen: dict) -> dict:
        """The base with W + scale * A @ B for every adapted matrix (host numpy, float32)."""
        flat = models.flatten(jax.tree.map(lambda a: np.asarray(a, np.float32), frozen))
        adapters = models.flatten(trainable)
        for path in self.paths:
            a, b = (np.asarray(adapters[f"{path}.lora_{x}"], np.float32) for x in "ab")
            flat[f"{path}.weight"] = flat[f"{path}.weight"] + self.cfg.scale * (a @ b)
        return models.unflatten_like(frozen, flat)


def _spec_of(name: str, rules) -> tuple:
    for pattern, spec in rules:
        if re.fullmatch(pattern, name):
            return tuple(spec) + (None,) * (3 - len(spec))  # (layer, in, out), padded
    raise ConfigError(f"no sharding rule matches {name!r}")


# =========================================================================== PEFT's format

def _peft_names(tuning: LoRATuning) -> dict[str, tuple[str, bool]]:
    """Our adapted path -> (PEFT's module key template with {i} for the layer, stacked?)."""
    table = {t.ours: t for t in tuning.family.hf_tensors(tuning.model_cfg)}
    out = {}
    for path in tuning.paths:
        t = table[f"{path}.weight"]
        out[path] = ("base_model.model." + t.hf.removesuffix(".weight"), t.stacked)
    return out


def save_peft(path: Path, tuning: LoRATuning, trainable: dict, base_name: str) -> Path:
    """adapter_config.json + adapter_model.safetensors in PEFT's LoRA format."""
    from safetensors.numpy import save_file
    path.mkdir(parents=True, exist_ok=True)
    adapters = models.flatten(jax.tree.map(lambda a: np.asarray(a, np.float32), trainable))
    tensors, modules = {}, []
    for ours, (module, stacked) in _peft_names(tuning).items():
        a, b = adapters[f"{ours}.lora_a"], adapters[f"{ours}.lora_b"]
        for i in range(a.shape[0] if stacked else 1):
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            name = module.format(i=i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)  # (r, in)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)  # (out, r)
        modules.append(re.escape(module.removeprefix("base_model.model.")).replace(
            r"\{i\}", r"\d+"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": tuning.cfg.rank, "lora_alpha": tuning.cfg.alpha,
        "lora_dropout": tuning.cfg.dropout, "target_modules": "|".join(modules),
        "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": tuning.family.name == "gpt2",  # HF GPT-2's Conv1D stores (in, out)
        "inference_mode": True, "modules_to_save": None,
    }
    tmp = path / (PEFT_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / PEFT_WEIGHTS)
    (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_peft(path: Path, tuning: LoRATuning) -> dict:
    """A PEFT LoRA adapter as our adapters (a pure dict), checked against this run's settings."""
    folder = Path(path).expanduser()
    cfg_file = folder / PEFT_CONFIG
    if not cfg_file.is_file():
        raise ConfigError(f"config key lora_init={str(path)!r}: no {PEFT_CONFIG} there")
    pc = json.loads(cfg_file.read_text())
    wrong = {k: (pc.get(pk), v) for k, pk, v in (("lora_rank", "r", tuning.cfg.rank),
                                                ("lora_alpha", "lora_alpha", tuning.cfg.alpha))
             if pc.get(pk) != v}
    if pc.get("use_rslora") or pc.get("use_dora") or pc.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{cfg_file}: only plain LoRA adapters load (no rsLoRA, DoRA)")
    if wrong:
        made = ", ".join(f"{k}={a!r}" for k, (a, _) in wrong.items())
        ours = ", ".join(f"{k}={b!r}" for k, (_, b) in wrong.items())
        raise ConfigError(f"{cfg_file}: the adapter was made with {made}; this run has {ours}")
    tensors, _ = hub.read_weights_file(folder / PEFT_WEIGHTS)
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
    out, used = {}, set()
    for ours, (module, stacked) in _peft_names(tuning).items():
        for part, ab in (("A", "a"), ("B", "b")):
            layers = range(tuning.model_cfg.n_layers if stacked else 1)
            keys = [f"{module.format(i=i)}.lora_{part}.weight" for i in layers]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ConfigError(f"{folder / PEFT_WEIGHTS}: no tensor {missing[0]!r} for the "
                                  f"adapted matrix {ours} (config key lora_target)")
            used.update(keys)
            mats = [np.asarray(tensors[k], np.float32).T for k in keys]
            out[f"{ours}.lora_{ab}"] = np.stack(mats) if stacked else mats[0]
    extra = sorted(set(tensors) - used)
    if extra:
        raise ConfigError(f"{folder / PEFT_WEIGHTS}: adapters {extra[:3]} ... are on matrices "
                          f"this run's lora_target does not adapt")
    template = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: _with_adapters(tuning)), nnx.LoRAParam))
    return models.unflatten_like(template, out)


def _with_adapters(tuning: LoRATuning):
    m = tuning.family.model_cls(tuning.model_cfg, rngs=nnx.Rngs(0))
    add_adapters(m, tuning.cfg, None, dropout=False)
    return m
