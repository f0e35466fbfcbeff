"""LoRA DPO: adapters on the matrices a regex picks; the frozen base, adapters off, is the reference.

``lora_rank`` > 0 wraps every ``Linear`` whose path fully matches ``lora_target`` (each family
has a default: the attention and MLP projections) in a ``LoRALinear``: the same ``weight`` and
``bias`` (so the same parameter paths) plus the adapters ``lora_a`` (in, r) and ``lora_b``
(r, out) as ``nnx.LoRAParam`` variables, with the layer axis of the stacked layers in front; it
computes ``x @ W + (alpha / r) * dropout(x) @ A @ B``. B starts at zero, so at step 0 the policy
is the base exactly. A is initialized as PEFT does (kaiming-uniform with a = sqrt(5): uniform in
+-1/sqrt(in)). The model's own layers never know about adapters.

Trainable = the adapters (the only gradient and optimizer state), frozen = the base params,
which with the adapters switched off are the reference: one copy of the base in memory, no
second model. Exports: ``merged_params`` (an ordinary HF model) and ``save_peft`` /
``load_peft`` (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads on top of the HF base model, and which can start a
run: config key ``lora_init``).
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
from safetensors.numpy import save_file

from dpo_jax import checkpoint, hub, models, quant, sharding, storage
from dpo_jax.errors import ConfigError
from dpo_jax.models import common
from dpo_jax.tuning import Parts, Tuning, register

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
    quantize: str = ""  # the frozen base's matrices: "" as loaded, "nf4", "int8", "fp8" (quant.py)
    quantize_embeddings: bool = False  # its embedding tables too
    double_quant: bool = False  # NF4's scales in 8 bits too

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config, family) -> "LoRAConfig":
        return cls(rank=config.lora_rank, alpha=float(config.lora_alpha),
                   dropout=float(config.lora_dropout),
                   target=config.lora_target or family.lora_target,
                   quantize=config.quantize_base,
                   quantize_embeddings=config.quantize_embeddings,
                   double_quant=config.double_quant)

    def record(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("quantize", "quantize_embeddings", "double_quant"):
            if not out[key]:  # as records were before these keys
                del out[key]
        return out


class LoRALinear(nnx.Module):
    """A ``Linear`` with low-rank adapters: its ``weight`` and ``bias`` are the wrapped layer's
    own variables, so the base keeps its parameter paths."""

    def __init__(self, base: common.Linear, cfg: LoRAConfig, a, b, dropout: bool):
        self.weight, self.bias, self.dtype = base.weight, base.bias, base.dtype
        self.lora_a = nnx.LoRAParam(a)
        self.lora_b = nnx.LoRAParam(b)
        self.lora_scale = cfg.scale
        self.lora_dropout = cfg.dropout if dropout else 0.0
        self.lora_key = (LoRAKey(jnp.zeros((*a.shape[:-2], 2), jnp.uint32))
                         if self.lora_dropout else None)

    def __call__(self, x):
        return common.apply_2d(self.project, x)

    def adapter_input(self, x2):
        """PEFT's: dropout on the adapter's input only (in an MLP tile, ``common.feed_forward``,
        the tile's number folded into the key: each tile its own mask)."""
        if not self.lora_dropout:
            return x2
        key = jax.random.wrap_key_data(self.lora_key[...])
        if common.tile_index() is not None:
            key = jax.random.fold_in(key, common.tile_index())
        keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x2.shape)
        return jnp.where(keep, x2 / (1.0 - self.lora_dropout), 0).astype(x2.dtype)

    def delta(self, h2):
        """(alpha / r) * h2 @ A @ B."""
        a = jnp.dot(h2, self.lora_a[...].astype(self.dtype))
        return self.lora_scale * jnp.dot(a, self.lora_b[...].astype(self.dtype))

    def project(self, x2):
        return common.project(self, x2) + self.delta(self.adapter_input(x2))


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


def _parent(model, path: str):
    *parents, name = path.split(".")
    node = model
    for part in parents:
        node = getattr(node, part)
    return node, name


def _spec_of(name: str, rules) -> tuple:
    for pattern, spec in rules:
        if re.fullmatch(pattern, name):
            return tuple(spec) + (None,) * (3 - len(spec))  # (layer, in, out), padded
    raise ConfigError(f"no sharding rule matches {name!r}")


@register
class LoRATuning(Tuning):
    """Trainable = adapters, frozen = the base (= the reference)."""

    name = "lora"
    wrapper = LoRALinear  # the module that wraps each adapted Linear

    def __init__(self, family, model_cfg, cfg: LoRAConfig, ref_dtype: str = "", init: str = ""):
        super().__init__(family, model_cfg, ref_dtype)
        self.cfg = cfg
        self.init = init  # a PEFT adapter folder to start from (config key lora_init)
        self.base_record = None  # the base's checksum, once split
        # checked here, outside any trace, so a bad target is a plain one-line error
        abstract = common.abstract(family.model_cls, model_cfg)
        self.paths = matched_paths(abstract, cfg)
        # quantize_base: every Linear matrix of the base, as bitsandbytes' load_in_4bit (all
        # nn.Linear but the LM head), the adapted ones and the others
        self.quantized_paths = linear_paths(abstract) if cfg.quantize else []
        self.quantized_tables = [  # quantize_embeddings: the embedding tables
            ".".join(map(str, path)) for path, node in nnx.iter_graph(abstract)
            if isinstance(node, common.Embedding)] if cfg.quantize_embeddings else []
        m_in, m_out = quant.block(cfg.quantize)
        unit = {"nf4": f"NF4's block of {quant.BLOCK}",
                "fp8": f"FP8's tile of {quant.FP8_TILE}"}.get(cfg.quantize)
        for path in self.quantized_paths:
            n_in, n_out = getattr(*_parent(abstract, path)).weight.shape[-2:]
            if n_in % m_in or n_out % m_out:
                bad = f"{n_in} inputs" if n_in % m_in else f"{n_out} outputs"
                raise ConfigError(f"config key quantize_base={cfg.quantize!r}: {path} has {bad}, "
                                  f"not a multiple of {unit}")
        for path in self.quantized_tables:
            n_rows, width = getattr(*_parent(abstract, path)).weight.shape[-2:]
            if width % m_in or n_rows % m_out:
                bad = f"is {width} wide" if width % m_in else f"has {n_rows} rows"
                raise ConfigError(f"config key quantize_embeddings=True: {path} {bad}, not a "
                                  f"multiple of {unit}")
        self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: self.adapted(None, False)))
        train = nnx.eval_shape(lambda: self.adapted(None, True))
        self.train_graphdef = nnx.graphdef(train)
        self.key_template = nnx.to_pure_dict(nnx.state(train, LoRAKey))
        self.base_graphdef = nnx.graphdef(nnx.eval_shape(lambda: self.quantized_layers(
            self.family.model_cls(self.model_cfg, rngs=nnx.Rngs(0)))))

    @classmethod
    def applies(cls, cfg) -> bool:
        return bool(cfg.lora_rank) and not cfg.use_dora

    @classmethod
    def from_config(cls, cfg, family, model_cfg, *, ref_dtype: str = "") -> "LoRATuning":
        return cls(family, model_cfg, LoRAConfig.from_config(cfg, family), ref_dtype,
                   cfg.lora_init)

    # ---- the adapted module
    def adapted(self, rngs: nnx.Rngs | None, dropout: bool):
        """The family's module with every matched Linear wrapped; with ``rngs`` None the
        adapters are zeros (a structure to restore or load into)."""
        model = self.quantized_layers(self.family.model_cls(self.model_cfg, rngs=nnx.Rngs(0)))
        for path in self.paths:
            parent, name = _parent(model, path)
            layer = getattr(parent, name)
            setattr(parent, name, self.wrap(layer, rngs, dropout))
        return model

    def quantized_layers(self, model):
        """``model`` with the weight of every quantized matrix (and table) an NF4, Int8 or FP8
        (zeros: a structure to load into)."""
        for path in self.quantized_paths + self.quantized_tables:
            layer = getattr(*_parent(model, path))
            layer.weight = nnx.Param(quant.zeros(layer.weight[...].shape, self.cfg.quantize,
                                                 rows=path in self.quantized_tables,
                                                 nested=self.cfg.double_quant))
        return model

    def wrap(self, layer: common.Linear, rngs: nnx.Rngs | None, dropout: bool):
        w = layer.weight[...]
        lead, (n_in, n_out) = w.shape[:-2], w.shape[-2:]
        r = self.cfg.rank
        if rngs is None:
            a = jnp.zeros((*lead, n_in, r), jnp.float32)
        else:  # PEFT's kaiming_uniform_(a=sqrt(5)) on lora_A: bound 1 / sqrt(fan_in)
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(rngs.params(), (*lead, n_in, r), jnp.float32, -bound, bound)
        b = jnp.zeros((*lead, r, n_out), jnp.float32)
        return self.wrapper(layer, self.cfg, a, b, dropout)

    # ---- the tuning contract
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

    def split(self, mesh, params, *, seed: int) -> Parts:
        params = self.quantized(params)
        specs = quant.fit_scales(mesh, params, sharding.param_specs(params, self.base_rules()))
        sharding.check_divisible(mesh, params, specs)
        base = self.base_in_memory(sharding.place(params, sharding.named(mesh, specs)))
        rules = self.rules(self.family.rules)
        trainable = (load_peft(self.init, self) if self.init else
                     self.init_trainable(mesh, seed, base, rules))
        return Parts(trainable, rules, jax.tree.map(lambda _: True, trainable), base)

    def base_in_memory(self, params: dict) -> dict:
        """The base as the run holds it (in ``ref_dtype``, its quantized matrices as they are);
        its checksum goes into the record, so a checkpoint's adapters are never put on another
        base, or on the same base quantized otherwise."""
        dtype = jnp.dtype(self.ref_dtype) if self.ref_dtype else None
        base = jax.tree.map(lambda a: a if quant.is_quantized(a) else
                            jnp.asarray(a).astype(dtype or a.dtype), params,
                            is_leaf=quant.is_quantized)
        self.base_record = np.asarray(checkpoint.checksum(base)).tolist()
        return base

    def quantized(self, params: dict) -> dict:
        """The loaded base with every matrix of ``quantized_paths`` quantized (on the host, once;
        a matrix that already is stays: an FP8 checkpoint's, as stored), every other dense."""
        flat = models.flatten(params)
        keep = {f"{p}.weight" for p in self.quantized_paths + self.quantized_tables}
        for name, w in flat.items():
            if quant.is_quantized(w) and name not in keep:
                flat[name] = w.dense()
        if not self.quantized_paths:
            return models.unflatten_like(params, flat)
        for path in self.quantized_paths + self.quantized_tables:
            w = flat[f"{path}.weight"]
            if not quant.is_quantized(w):
                flat[f"{path}.weight"] = quant.quantize(np.asarray(w, np.float32),
                                                        self.cfg.quantize,
                                                        rows=path in self.quantized_tables,
                                                        nested=self.cfg.double_quant)
        return models.unflatten_like(params, flat)

    def base_rules(self) -> list:
        """Sharding rules of the frozen base: the family's, and its quantized matrices' codes and
        scales split as their matrix."""
        return quant.rules(self.quantized_paths, lambda name: _spec_of(
            name, self.family.rules), self.quantized_tables,
            self.cfg.quantize, self.cfg.double_quant) + list(self.family.rules)

    def init_trainable(self, mesh, seed: int, base: dict, rules) -> dict:
        """Fresh adapters, placed: A random, B zero."""
        return sharding.init_params(mesh, self.init_adapters(seed), rules)

    def record(self) -> dict:
        return {"method": self.name, **self.cfg.record(), "base": self.base_record}

    def trainable_template(self, base_params: dict) -> dict:
        return jax.eval_shape(self.init_adapters(0))

    def restore_policy(self, ckpt, step, base_params, expect):
        return super().restore_policy(ckpt, step,
                                      self.base_in_memory(self.quantized(base_params)), expect)

    # ---- params
    def init_adapters(self, seed: int):
        """A function making fresh adapters (a pure dict): A random, B zero."""
        def init():
            return nnx.to_pure_dict(nnx.state(self.adapted(nnx.Rngs(seed + 1), False),
                                              nnx.LoRAParam))
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

    def merged_weight(self, w, adapters: dict, path: str):
        """W + scale * A @ B of one adapted matrix (host float32)."""
        a, b = (np.asarray(adapters[f"{path}.lora_{x}"], np.float32) for x in "ab")
        return w + self.cfg.scale * (a @ b)

    def export_dtype(self) -> str:
        """A quantized base merges in the compute dtype, as PEFT's ``merge_and_unload`` on a
        bitsandbytes base (dequantized to ``bnb_4bit_compute_dtype``, the delta added); an
        unquantized one in float32."""
        return self.model_cfg.dtype if self.cfg.quantize else "float32"

    def merged_params(self, trainable, frozen) -> dict:
        """The base with every adapted matrix merged (host numpy, float32); a quantized base
        dequantized first (as PEFT's merge into a bitsandbytes base)."""
        frozen = quant.dense(sharding.to_host(frozen))
        flat = models.flatten(jax.tree.map(lambda a: np.asarray(a, np.float32), frozen))
        adapters = models.flatten(trainable)
        for path in self.paths:
            flat[f"{path}.weight"] = self.merged_weight(flat[f"{path}.weight"], adapters, path)
        return models.unflatten_like(frozen, flat)

    def export(self, workdir, trainable, *, base_name: str) -> None:
        save_peft(Path(workdir) / "adapter", self, trainable, base_name)

    # ---- PEFT's format: per adapted matrix, (PEFT's tensor suffix, our leaf, transpose)
    def peft_tensors(self) -> list[tuple[str, str, bool]]:
        return [("lora_A.weight", "lora_a", True), ("lora_B.weight", "lora_b", True)]

    def peft_config(self) -> dict:
        return {"use_dora": False}


# =========================================================================== PEFT's format

def _peft_names(tuning: LoRATuning) -> dict[str, tuple[str, bool]]:
    """Our adapted path -> (PEFT's module key template with {i} for the layer, the HF layer
    indices of its stacked axis, or None where it is not stacked)."""
    table = {p: t for t in tuning.family.hf_tensors(tuning.model_cfg) for p in t.paths}
    out = {}
    for path in tuning.paths:
        t = table[f"{path}.weight"]
        if len(t.paths) > 1:
            raise ConfigError(f"config key lora_target: {path} is fused with "
                              f"{', '.join(p for p in t.paths if p != path + '.weight')} in the "
                              f"checkpoint ({t.hf}), where PEFT puts one adapter on the fused "
                              "matrix, not one per part: leave it out of lora_target")
        out[path] = ("base_model.model." + t.hf.removesuffix(".weight"),
                     t.layer_ids(tuning.model_cfg.n_layers) if t.stacked else None)
    return out


def save_peft(path: Path, tuning: LoRATuning, trainable: dict, base_name: str) -> Path:
    """adapter_config.json + adapter_model.safetensors in PEFT's format."""
    path.mkdir(parents=True, exist_ok=True)
    adapters = models.flatten(jax.tree.map(lambda a: np.asarray(a, np.float32), trainable))
    tensors, modules = {}, []
    for ours, (module, layers) in _peft_names(tuning).items():
        for suffix, leaf, transpose in tuning.peft_tensors():
            x = adapters[f"{ours}.{leaf}"]
            for n, i in enumerate(layers or (0,)):
                xi = x[n] if layers else x
                tensors[f"{module.format(i=i)}.{suffix}"] = np.ascontiguousarray(
                    xi.T if transpose else xi)
        modules.append(re.escape(module.removeprefix("base_model.model.")).replace(
            r"\{i\}", r"\d+"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": tuning.cfg.rank, "lora_alpha": tuning.cfg.alpha,
        "lora_dropout": tuning.cfg.dropout, "target_modules": "|".join(modules),
        "bias": "none", "use_rslora": False, **tuning.peft_config(),
        "fan_in_fan_out": tuning.family.name == "gpt2",  # HF GPT-2's Conv1D stores (in, out)
        "inference_mode": True, "modules_to_save": None,
    }
    tmp = path / (PEFT_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / PEFT_WEIGHTS)
    (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_peft(path, tuning: LoRATuning) -> dict:
    """A PEFT adapter as our trainable params (a pure dict), checked against this run's
    settings: its kind (LoRA or DoRA), rank, alpha and every tensor's shape."""
    folder = (storage.fetch(str(path), "config key lora_init") if storage.is_url(str(path))
              else Path(path).expanduser())
    cfg_file = folder / PEFT_CONFIG
    where = f"config key lora_init={str(path)!r}"
    if not cfg_file.is_file():
        raise ConfigError(f"{where}: no {PEFT_CONFIG} there")
    try:
        pc = json.loads(cfg_file.read_text())
        if not isinstance(pc, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not a PEFT adapter config ({e})") from None
    kind = "DoRA" if pc.get("use_dora") else "LoRA"
    want_kind = "DoRA" if tuning.peft_config().get("use_dora") else "LoRA"
    if pc.get("use_rslora") or pc.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{cfg_file}: only plain LoRA and DoRA adapters load (no rsLoRA, "
                          f"{pc.get('peft_type')})")
    if kind != want_kind:
        raise ConfigError(f"{cfg_file}: a {kind} adapter, and this run trains {want_kind} "
                          f"(config key use_dora={want_kind == 'DoRA'})")
    wrong = {k: (pc.get(pk), v) for k, pk, v in (("lora_rank", "r", tuning.cfg.rank),
                                                ("lora_alpha", "lora_alpha", tuning.cfg.alpha))
             if pc.get(pk) != v}
    if wrong:
        made = ", ".join(f"{k}={a!r}" for k, (a, _) in wrong.items())
        ours = ", ".join(f"{k}={b!r}" for k, (_, b) in wrong.items())
        raise ConfigError(f"{cfg_file}: the adapter was made with {made}; this run has {ours}")
    tensors, _ = hub.read_weights_file(folder / PEFT_WEIGHTS)
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
    template = models.flatten(tuning.trainable_template({}))
    out, used = {}, set()
    for ours, (module, layers) in _peft_names(tuning).items():
        stacked = layers is not None
        for suffix, leaf, transpose in tuning.peft_tensors():
            keys = [f"{module.format(i=i)}.{suffix}" for i in (layers or (0,))]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ConfigError(f"{folder / PEFT_WEIGHTS}: no tensor {missing[0]!r} for the "
                                  f"adapted matrix {ours} (config key lora_target)")
            used.update(keys)
            mats = [np.asarray(tensors[k], np.float32) for k in keys]
            mats = [m.T if transpose else m for m in mats]
            value = np.stack(mats) if stacked else mats[0]
            want = tuple(template[f"{ours}.{leaf}"].shape)
            if value.shape != want:
                raise ConfigError(f"{folder / PEFT_WEIGHTS}: {keys[0]!r} and its layers make "
                                  f"{value.shape} where this model's {ours}.{leaf} is {want} "
                                  "(an adapter of another model?)")
            out[f"{ours}.{leaf}"] = value
    extra = sorted(set(tensors) - used)
    if extra:
        raise ConfigError(f"{folder / PEFT_WEIGHTS}: adapters {extra[:3]} ... are on matrices "
                          f"this run's lora_target does not adapt")
    return models.unflatten_like(tuning.trainable_template({}), out)
