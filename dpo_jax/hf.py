"""Hugging Face GPT-2 checkpoints <-> our Flax module.

Our parameter names are HF's own (``model.py``), so the import table is the identity on names,
with one twist: our blocks are stacked, so HF key ``transformer.h.3.attn.c_attn.weight`` (or
``h.3.attn.c_attn.weight`` in the original ``gpt2`` repository, which stores a bare
``GPT2Model``) is slice 3 of our ``h.attn.c_attn.weight`` (n_layer, C, 3C).

Layout: HF GPT-2 uses ``Conv1D``, whose weight is (in, out), not ``nn.Linear``'s (out, in). Our
``Conv1D`` stores (in, out) too, so no tensor is transposed on import or export. Every tensor's
shape is checked against the shape config.json implies; a mismatch names the file and the key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.model import GPT2, GPT2Config, abstract_model

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, TORCH_INDEX)

# Non-persistent buffers that older transformers versions saved with the weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# The fields of HF's GPT2Config that we read; the rest (dropouts, summary_*, task params) do not
# change the forward pass at inference and training-without-dropout.
_ARCH_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                "activation_function", "layer_norm_epsilon", "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx", "bos_token_id", "eos_token_id")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be turned into a GPT-2: the message names file and key."""


# --------------------------------------------------------------------------- config

def config_from_hf(hf_config: dict, *, source: str = "config.json", **overrides) -> GPT2Config:
    model_type = hf_config.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{source}: model_type is {model_type!r}; only 'gpt2' is supported")
    if hf_config.get("add_cross_attention"):
        raise CheckpointError(f"{source}: add_cross_attention=True is not supported")
    if hf_config.get("tie_word_embeddings") is False:
        raise CheckpointError(
            f"{source}: tie_word_embeddings=False is not supported (GPT-2's LM head is wte)")
    kwargs = {k: hf_config[k] for k in _ARCH_FIELDS if hf_config.get(k) is not None}
    kwargs.update(overrides)
    try:
        return GPT2Config(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: GPT2Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **{k: getattr(cfg, k) for k in _ARCH_FIELDS},
        "n_ctx": cfg.n_positions,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


# --------------------------------------------------------------------------- param trees

def flatten_params(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'h': {0: {'ln_1': {'weight': x}}}} -> {'h.0.ln_1.weight': x} (HF's key spelling)."""
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten_params(v, name + "."))
        else:
            flat[name] = v
    return flat


def _hf_names(name: str, n_layer: int) -> list[str]:
    """HF's keys for one of our params: the stacked blocks ``h.X`` are HF's ``h.{i}.X``."""
    if name.startswith("h."):
        return [f"h.{i}.{name[2:]}" for i in range(n_layer)]
    return [name]


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def hf_state_dict(params: dict, n_layer: int) -> dict[str, np.ndarray]:
    """Our params as HF GPT2Model tensors (float32 numpy), the stacked blocks split per layer."""
    out = {}
    for name, value in flatten_params(params).items():
        value = np.asarray(value, dtype=np.float32)
        for i, hf_name in enumerate(_hf_names(name, n_layer)):
            out[hf_name] = np.ascontiguousarray(value[i] if name.startswith("h.") else value)
    return out


def _unflatten_into(template: dict, flat: dict, prefix: str = "") -> dict:
    return {k: (_unflatten_into(v, flat, f"{prefix}{k}.") if isinstance(v, dict)
                else flat[f"{prefix}{k}"]) for k, v in template.items()}


def model_params(model: GPT2) -> dict:
    """The model's parameters as a plain nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------- reading

def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the library's errors name neither the file nor what to do
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: a PyTorch pickle checkpoint needs torch installed to read it safely "
            "(torch.load(weights_only=True)); install torch or convert it to safetensors") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in sd.items()}


def _read_weights(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors in the folder, and for each key the file it came from (for error messages)."""
    if (folder / SAFETENSORS_FILE).exists():
        files, reader = [folder / SAFETENSORS_FILE], _read_safetensors
    elif (folder / SAFETENSORS_INDEX).exists() or (folder / TORCH_INDEX).exists():
        index = folder / (SAFETENSORS_INDEX if (folder / SAFETENSORS_INDEX).exists() else TORCH_INDEX)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e!r})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} lists shard {f.name}, which is not in {folder}")
        reader = _read_safetensors if index.name == SAFETENSORS_INDEX else _read_torch_bin
    elif (folder / TORCH_FILE).exists():
        files, reader = [folder / TORCH_FILE], _read_torch_bin
    else:
        raise CheckpointError(
            f"no weight file in {folder}: expected one of {', '.join(WEIGHT_FILES)}")
    tensors, origin = {}, {}
    for f in files:
        for k, v in reader(f).items():
            tensors[k], origin[k] = v, f.name
    return tensors, origin


def _resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name}: no such checkpoint folder")
    return _download(name)


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub: huggingface_hub itself retries a dead network with
    backoff for ~25 s before giving up, which is no way to learn that a machine is offline."""
    import socket
    from urllib.parse import urlparse
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download(repo_id: str) -> Path:
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not a local folder and huggingface_hub is not "
                              "installed to fetch it from the hub") from None
    hint = ("Pass a local folder that holds config.json and model.safetensors (e.g. one written "
            "by transformers' save_pretrained) instead")

    def fetch(fname, local_only):
        return Path(hub.hf_hub_download(repo_id, fname, local_files_only=local_only))

    def fetch_all(local_only):
        folder = fetch(CONFIG_FILE, local_only).parent
        for fname in WEIGHT_FILES:
            try:
                fetch(fname, local_only)
            except (hub.errors.EntryNotFoundError, hub.errors.LocalEntryNotFoundError):
                continue
            if fname.endswith(".index.json"):
                for shard in sorted(set(json.loads((folder / fname).read_text())["weight_map"].values())):
                    fetch(shard, local_only)
            return folder
        raise CheckpointError(f"hub repository {repo_id!r} has no weight file "
                              f"({', '.join(WEIGHT_FILES)})")

    try:  # the HF cache first: works offline once a model has been downloaded
        return fetch_all(local_only=True)
    except (CheckpointError, hub.errors.LocalEntryNotFoundError, OSError):
        pass
    if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
        raise CheckpointError(f"{repo_id!r} is not a local folder, is not in the Hugging Face "
                              f"cache, and the hub ({constants.ENDPOINT}) cannot be reached "
                              f"(offline). {hint}")
    try:
        return fetch_all(local_only=False)
    except CheckpointError:
        raise
    except Exception as e:  # 401/404 and friends: one clear message
        raise CheckpointError(f"could not fetch {repo_id!r} from the Hugging Face Hub "
                              f"[{type(e).__name__}: {e}]. {hint}") from None


def load_pretrained_params(name_or_path: str | os.PathLike, *, dtype: str = "float32",
                           **compute_options) -> tuple[GPT2Config, dict]:
    """(config, params as a nested dict of float32 numpy arrays) of an HF GPT-2 checkpoint.

    Host memory only: callers place the arrays (e.g. sharded over a mesh, see sharding.place).
    """
    folder = _resolve(name_or_path)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.exists():
        raise CheckpointError(f"no {CONFIG_FILE} in {folder}")
    try:
        hf_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf_config, source=str(cfg_path), dtype=dtype, **compute_options)

    tensors, origin = _read_weights(folder)
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    origin = {k.removeprefix("transformer."): v for k, v in origin.items()}

    template = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    ours = flatten_params(template)
    hf_names = {name: _hf_names(name, cfg.n_layer) for name in ours}
    expected = {n for names in hf_names.values() for n in names}
    missing = sorted(expected - set(tensors), key=_natural)
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    loaded = {}
    for name, spec in ours.items():
        per_layer = name.startswith("h.")
        want = tuple(spec.shape[1:]) if per_layer else tuple(spec.shape)
        parts = []
        for hf_name in hf_names[name]:
            t = tensors[hf_name]
            if tuple(t.shape) != want:
                raise CheckpointError(
                    f"{folder / origin[hf_name]}: tensor {hf_name!r} has shape {tuple(t.shape)}, "
                    f"but {CONFIG_FILE} implies {want}")
            parts.append(np.asarray(t, dtype=np.float32))
        loaded[name] = np.stack(parts) if per_layer else parts[0]
    unexpected = sorted(k for k in set(tensors) - expected
                        if not k.endswith(_IGNORED_SUFFIXES) and k != "lm_head.weight")
    if unexpected:
        log.warning("%s: ignoring unexpected tensors %s", folder, unexpected)
    return cfg, _unflatten_into(template, loaded)


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: str = "float32",
                    **compute_options) -> GPT2:
    """GPT-2 with weights from a local HF folder or a hub id (gpt2, gpt2-medium, distilgpt2, ...).

    dtype is the compute dtype; parameters are always float32. compute_options are the other
    GPT2Config compute fields (remat, remat_policy). Missing tensors or tensors whose shape
    disagrees with config.json are errors naming the key; unexpected keys are logged.
    """
    cfg, params = load_pretrained_params(name_or_path, dtype=dtype, **compute_options)
    return build(cfg, jax.tree.map(jnp.asarray, params))


def build(cfg: GPT2Config, params: dict) -> GPT2:
    """The module with the given params (a nested dict as ``model_params`` returns)."""
    graphdef, state = nnx.split(abstract_model(cfg), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_tokenizer(name_or_path: str | os.PathLike):
    """A transformers tokenizer from a local folder, the HF cache, or the hub (fast offline error)."""
    from transformers import AutoTokenizer
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or not name:
        raise CheckpointError(f"{name!r}: no such tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
        raise CheckpointError(f"tokenizer {name!r} is not a local folder, is not in the Hugging "
                              f"Face cache, and the hub cannot be reached (offline). Pass a local "
                              "tokenizer folder (config key tokenizer_name_or_path) instead")
    return AutoTokenizer.from_pretrained(name)


# --------------------------------------------------------------------------- writing

def save_pretrained(model: GPT2, path: str | os.PathLike) -> Path:
    """Writes config.json + model.safetensors that transformers' GPT2LMHeadModel loads as is.

    Tensors are saved float32 under GPT2LMHeadModel's names (``transformer.`` prefix); the LM head
    is tied to wte, so it is not stored (transformers re-ties it on load).
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v
               for k, v in hf_state_dict(model_params(model), model.config.n_layer).items()}
    # Write to temporary names, then rename, so a kill mid-write never leaves a half file that
    # looks complete.
    tmp_w, tmp_c = path / (SAFETENSORS_FILE + ".tmp"), path / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    os.replace(tmp_w, path / SAFETENSORS_FILE)
    os.replace(tmp_c, path / CONFIG_FILE)
    return path
