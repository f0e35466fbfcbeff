"""Hugging Face checkpoints <-> our Flax modules, for every registered model family.

``load_pretrained("path/or/hub-id")`` reads ``config.json``, finds the family by ``model_type``
(``dpo_jax.models``), reads the tensors (``hub.read_weights``) and places each one by the family's
name table: per-layer HF tensors are stacked into our scanned layers, ``nn.Linear``'s (out, in)
tensors transposed to our (in, out). Every tensor's shape is checked against ``config.json``; a
mismatch names the file and the key, a missing tensor is an error, an unexpected one a warning.
``save_pretrained`` is the same table backwards: a folder transformers loads with no missing or
unexpected keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from dpo_jax import hub, models, quant, sharding
from dpo_jax import keys as K
from dpo_jax.errors import ConfigError, choice
from dpo_jax.hub import CheckpointError, hub_reachable, load_tokenizer  # noqa: F401 (API)
from dpo_jax.models import attention, common

log = logging.getLogger(__name__)


def _model_spec(name, v):
    spec = dict(v)
    try:
        models.family_for(spec.get("model_type", "gpt2"))
    except ValueError as e:
        raise ConfigError(f"config key {name}.model_type: {e}") from None
    for k, x in spec.items():
        if isinstance(x, int) and not isinstance(x, bool) and x <= 0 and k != "model_type":
            raise ConfigError(f"config key {name}.{k}={x!r}: must be > 0")


def _ref_dtype(name, v):
    if v != "":
        choice(name, v, tuple(common.DTYPES))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """model (dpo_jax/hf.py, dpo_jax/models/)"""

    model_name_or_path: str = K.key("gpt2", "HF hub id or local HF folder; \"\" = random init "
                                    "from model", K.text, resume=True)
    # Architecture for random init (ignored otherwise): an HF config.json in miniature, its
    # model_type naming the family and the other keys that family's config.json fields.
    model: dict = K.key(dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768,
                             n_layer=12, n_head=12),
                        "architecture for random init (when model_name_or_path is \"\"): an HF "
                        "config.json in miniature (configs/tiny_llama.py has a Llama one)")
    tokenizer_name_or_path: str = K.key("", "HF tokenizer folder or hub id; \"\" = the model's",
                                        K.text, resume=True)
    dtype: str = K.key("float32", "compute dtype: float32 | bfloat16 (params stay float32)",
                       K.one_of(*common.DTYPES), resume=True)
    ref_dtype: str = K.key("", "frozen params' dtype (the reference; LoRA's base): \"\" = "
                           "float32", _ref_dtype, resume=True)
    remat: bool = K.key(False, "recompute each block's activations in the backward pass", K.flag)
    remat_policy: str = K.key("nothing_saveable", "or dots_saveable / "
                              "dots_with_no_batch_dims_saveable", K.one_of(*common.REMAT))
    attention: str = K.key("auto", "auto (cudnn on GPU, splash on TPU, else xla; tiled for "
                           "rows of 4096+ tokens no kernel takes) / xla / cudnn / splash / "
                           "tiled", K.one_of(*attention.CHOICES))
    mlp: str = K.key("auto", "the MLP: auto (tiled for rows of 4096+ tokens) / full (whole "
                     "rows) / tiled (in tiles of 2048 positions per row and device, each "
                     "recomputed in the backward pass: a tile's hidden activations at most)",
                     K.one_of("auto", "full", "tiled"))
    moe_kernel: str = K.key("auto", "a mixture of experts' grouped matmuls: auto (ragged_dot on "
                            "GPU / TPU, else scan) / ragged_dot / scan",
                            K.one_of("auto", "ragged_dot", "scan"))

    def __post_init__(self):
        K.check_fields(self)
        if not self.model_name_or_path:  # else the architecture comes from the checkpoint
            _model_spec("model", self.model)


def config_from_hf(hf_config: dict, *, source: str = "config.json", **compute):
    """The family config of a ``config.json`` dict; ``compute`` are compute options (dtype, ...)."""
    try:
        family = models.family_for(hf_config.get("model_type"))
        return family.config_from_hf(hf_config, **compute)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg, dtype: str = "float32") -> dict:
    return {**models.family_of(cfg).config_to_hf(cfg), "dtype": dtype}


def model_params(model) -> dict:
    """The model's parameters as a plain nested dict of arrays."""
    return common.params_of(model)


def build(cfg, params: dict):
    """The family's module with the given params (a nested dict as ``model_params`` returns)."""
    return common.build(models.family_of(cfg).model_cls, cfg, params)


def hf_state_dict(cfg, params: dict) -> dict[str, np.ndarray]:
    """Our params as HF tensors (float32 numpy), by the family's name table."""
    flat = models.flatten(params)
    out = {}
    for t in models.family_of(cfg).hf_tensors(cfg):
        values = [np.asarray(flat[p], dtype=np.float32) for p in t.paths]
        for n, i in enumerate(t.layer_ids(len(values[0]))):
            parts = [v[n] for v in values] if t.stacked else values
            for j in range(t.experts or 1):  # one HF tensor per expert where there are any
                one = [x[j] for x in parts] if t.experts else parts
                out[t.hf.format(i=i, j=j)] = np.ascontiguousarray(t.to_hf(one))
    return out


def load_pretrained_params(name_or_path: str | os.PathLike, *, dtype: str = "float32",
                           keep_fp8: bool = False, **compute_options) -> tuple[object, dict]:
    """(config, params as a nested dict of float32 numpy arrays) of an HF checkpoint.

    Host memory only: callers place the arrays (e.g. sharded over a mesh, see sharding.place).
    ``keep_fp8``: a fine-grained FP8 checkpoint's matrices stay ``quant.FP8`` (its own codes
    and scales, the bytes as stored; for ``quantize_base="fp8"``) where they are whole 128 x
    128 tiles of one of our matrices, transposed only; the rest dequantized.
    """
    folder = hub.resolve(name_or_path)
    hf_config = hub.read_config(folder)
    cfg = config_from_hf(hf_config, source=str(folder / hub.CONFIG_FILE), dtype=dtype,
                         **compute_options)
    family = models.family_of(cfg)
    tensors, origin = hub.read_weights(folder)
    tensors = _dequantize_fp8(hf_config, tensors, folder, keep=keep_fp8)
    tensors = {family.hf_key(k): v for k, v in tensors.items()}
    origin = {family.hf_key(k): v for k, v in origin.items()}

    template = common.params_of(common.abstract(family.model_cls, cfg))
    shapes = {k: tuple(v.shape) for k, v in models.flatten(template).items()}
    table = family.hf_tensors(cfg)
    expected = {t.hf.format(i=i, j=j) for t in table
                for i in t.layer_ids(cfg.n_layers) for j in range(t.experts or 1)}
    missing = sorted(expected - set(tensors), key=_natural)
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    loaded = {}
    for t in table:
        ours = [shapes[p][1:] if t.stacked else shapes[p] for p in t.paths]
        if t.experts:  # one HF tensor per expert: shapes without the expert axis
            ours = [s[1:] for s in ours]
        want = t.hf_shape(ours)

        def read(key):
            a = tensors[key]
            if tuple(a.shape) != want:
                raise CheckpointError(
                    f"{folder / origin[key]}: tensor {key!r} has shape {tuple(a.shape)}, "
                    f"but {hub.CONFIG_FILE} implies {want}")
            if isinstance(a, quant.FP8):  # its codes are HF's (out, in): ours, transposed
                if t.transpose and len(t.paths) == 1 and t.row_order is None:
                    return [quant.FP8(a.codes, a.absmax)]
                a = a.dense()
            return t.to_ours(np.asarray(a, dtype=np.float32), ours)

        layers = []
        for i in t.layer_ids(cfg.n_layers):
            if t.experts:
                per = [read(t.hf.format(i=i, j=j)) for j in range(t.experts)]
                layers.append([_stack([e[k] for e in per]) for k in range(len(t.paths))])
            else:
                layers.append(read(t.hf.format(i=i)))
        for j, path in enumerate(t.paths):
            loaded[path] = (_stack([parts[j] for parts in layers]) if t.stacked
                            else layers[0][j])
    unexpected = sorted(k for k in set(tensors) - expected
                        if not any(re.fullmatch(p, k) for p in family.hf_ignored))
    if unexpected:
        log.warning("%s: ignoring unexpected tensors %s", folder, unexpected)
    return cfg, models.unflatten_like(template, loaded)


def _stack(parts: list):
    """Per-layer (or per-expert) arrays stacked; ``quant.FP8`` parts stacked as one (their
    codes and scales), unless some part is dense (then all dequantized)."""
    if all(isinstance(p, quant.FP8) for p in parts):
        return quant.FP8(np.stack([p.codes for p in parts]), np.stack([p.absmax for p in parts]))
    return np.stack([p.dense() if isinstance(p, quant.FP8) else p for p in parts])


def _dequantize_fp8(hf_config: dict, tensors: dict, folder, keep: bool = False) -> dict:
    """A fine-grained FP8 checkpoint's (``quantization_config.quant_method: fp8``: DeepSeek-V3's,
    Qwen3's *-FP8) float8_e4m3fn weights times their per-tile ``weight_scale_inv``, float32, as
    transformers loads one on a CPU (``Fp8Dequantize``); the scales dropped. Other checkpoints
    as they are. With ``keep``, a weight whose scales are per 128 x 128 tile (``quant.FP8``'s
    layout) stays as stored, a ``quant.FP8`` in HF's layout (``rows``), for the loader to keep
    or dequantize; without it, ``quantize_base="fp8"`` would quantize the dequantized matrices
    again (transformers' codec gives back the same codes, and scales within an ulp)."""
    qc = hf_config.get("quantization_config") or {}
    if qc.get("quant_method") != "fp8":
        return tensors
    if qc.get("scale_fmt", "float") != "float" or qc.get("activation_scheme") == "static":
        raise CheckpointError(f"{folder}: an FP8 checkpoint with scale_fmt="
                              f"{qc.get('scale_fmt')!r}, activation_scheme="
                              f"{qc.get('activation_scheme')!r}: only float per-tile weight "
                              "scales (dynamic activations) are read")
    out = {}
    for key, a in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        inv = tensors.get(f"{key}_scale_inv")
        if inv is None:
            out[key] = a
            continue
        inv = np.asarray(inv, np.float32).reshape(a.shape[:-2] + inv.shape[-2:])
        (rows, cols), (sr, sc) = a.shape[-2:], inv.shape[-2:]
        if rows % sr or cols % sc:
            raise CheckpointError(f"{folder}: FP8 tensor {key!r} {tuple(a.shape)} does not cut "
                                  f"into its scales' grid {tuple(inv.shape)}")
        q = quant.FP8(np.asarray(a), inv, rows=True)  # as HF lays it out
        whole = (sr * quant.FP8_TILE, sc * quant.FP8_TILE) == (rows, cols)
        out[key] = q if keep and whole else q.dense()
    if keep:
        kept = sum(isinstance(a, quant.FP8) for a in out.values())
        log.info("%s: %d FP8 matrices kept as stored (codes and scales)", folder, kept)
    return out


def _natural(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: str = "float32",
                    **compute_options):
    """A model with weights from a local HF folder or a hub id ("gpt2", "Qwen/Qwen3-0.6B", ...).

    dtype is the compute dtype; parameters are always float32 (bfloat16 checkpoints are widened).
    compute_options are the other compute fields (remat, remat_policy, attention).
    """
    cfg, params = load_pretrained_params(name_or_path, dtype=dtype, **compute_options)
    return build(cfg, jax.tree.map(jnp.asarray, params))


def save_pretrained(model, path: str | os.PathLike, *, max_shard_bytes: int = 5 << 30) -> Path:
    """Writes config.json + safetensors (float32, sharded with an index above max_shard_bytes)
    that transformers loads as the family's HF class with no missing or unexpected keys."""
    return save_params(model.config, model_params(model), path, max_shard_bytes=max_shard_bytes)


def save_params(cfg, params: dict, path: str | os.PathLike, *, dtype: str = "float32",
                max_shard_bytes: int = 5 << 30) -> Path:
    """``save_pretrained`` from a config and a params dict (host or device arrays), the
    tensors in ``dtype`` ("float32" or "bfloat16", rounded to nearest even)."""
    tensors = hf_state_dict(cfg, params)
    if dtype != "float32":
        tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    return hub.write_weights(Path(path), tensors, config_to_hf(cfg, dtype),
                             max_shard_bytes=max_shard_bytes)


def initial_model(cfg: ModelConfig, tokenizer, mesh=None, seed: int = 0,
                  keep_fp8: bool = False) -> tuple[object, dict]:
    """(model config, params) of the policy a run starts from (= its reference): an HF checkpoint or
    random (from ``seed``) by ``cfg.model`` (an HF config.json in miniature: ``model_type`` and the
    family's fields). With a mesh, random params are created already sharded; checkpoint params
    stay host numpy arrays for ``sharding.init_state`` to place. ``keep_fp8``: an FP8
    checkpoint's matrices as stored (``load_pretrained_params``)."""
    compute = dict(dtype=cfg.dtype, remat=cfg.remat, remat_policy=cfg.remat_policy)
    if cfg.model_name_or_path:
        model_cfg, params = load_pretrained_params(cfg.model_name_or_path, keep_fp8=keep_fp8,
                                                   **compute)
    else:
        spec = dict(cfg.model)
        spec.setdefault("model_type", "gpt2")  # workdirs written before families had no key
        spec.setdefault("bos_token_id", tokenizer.bos_token_id
                        if tokenizer.bos_token_id is not None else 0)
        spec.setdefault("eos_token_id", tokenizer.eos_token_id)
        model_cfg = config_from_hf(spec, source="config key model", **compute)
        family = models.family_of(model_cfg)

        def init_fn():
            return common.params_of(family.model_cls(model_cfg, rngs=nnx.Rngs(seed)))
        params = (sharding.init_params(mesh, init_fn, family.rules) if mesh is not None
                  else jax.jit(init_fn)())
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model_cfg.vocab_size} (config key model.vocab_size, or another tokenizer)")
    return model_cfg, params
