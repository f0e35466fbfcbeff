"""Hugging Face files: where a model or tokenizer lives, and reading and writing its tensors.

Written once for every model family (the names inside the files are the family's business,
``models/*/params.py``):

- ``resolve(name_or_path)``: a local folder as is; otherwise a hub id, looked up in the HF cache
  first and downloaded only when the hub is reachable. Offline, it fails at once with advice
  (``hub_reachable`` makes one quick TCP probe; huggingface_hub itself retries for ~25 s).
- ``read_config`` / ``read_weights``: ``config.json``; ``model.safetensors``, sharded safetensors
  with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (sharded or not, read with
  ``torch.load(weights_only=True)`` and only when torch is installed). bfloat16 tensors come back
  as float32 numpy arrays.
- ``write_weights``: safetensors written under temporary names and renamed, sharded with an index
  above ``max_shard_bytes``, so a kill mid-write never leaves a file that looks complete.
- ``load_tokenizer``: a transformers tokenizer from a folder, the cache or the hub.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub as hub
import ml_dtypes
import numpy as np
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoTokenizer

from dpo_jax import storage
from dpo_jax.errors import DpoError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, TORCH_INDEX)


class CheckpointError(DpoError, ValueError):
    """A checkpoint folder that cannot be read as a model: the message names file and key."""


# =========================================================================== where

def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the hub answers: False at once when HF_HUB_OFFLINE is set, else one quick TCP
    connect (huggingface_hub retries a dead network with backoff for ~25 s before giving up,
    which is no way to learn that a machine is offline)."""

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(endpoint or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_local_name(name: str, path: Path) -> bool:
    """A name that can only mean a local path (so a missing one is not looked up on the hub)."""
    return path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local model folder as is; a bucket's folder (gs://) fetched once to this disk;
    otherwise a hub id, from the HF cache or downloaded."""
    if storage.is_url(str(name_or_path)):
        return storage.fetch(str(name_or_path), "model_name_or_path")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if _is_local_name(name, path):
        raise CheckpointError(f"{name}: no such checkpoint folder")
    return _download(name)


def _download(repo_id: str) -> Path:
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
                index = json.loads((folder / fname).read_text())["weight_map"]
                for shard in sorted(set(index.values())):
                    fetch(shard, local_only)
            return folder
        raise CheckpointError(f"hub repository {repo_id!r} has no weight file "
                              f"({', '.join(WEIGHT_FILES)})")

    try:  # the HF cache first: works offline once a model has been downloaded
        return fetch_all(local_only=True)
    except (CheckpointError, hub.errors.LocalEntryNotFoundError, OSError):
        pass
    if not hub_reachable():
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


# =========================================================================== reading

def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"no {CONFIG_FILE} in {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (TypeError, AttributeError):  # numpy has no bfloat16 or float8: read through the
        return _read_safetensors_bf16(path)  # ml_dtypes-aware, torch-free path
    except Exception as e:  # the library's errors name neither the file nor what to do
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_safetensors_bf16(path: Path) -> dict[str, np.ndarray]:
    """safetensors' numpy reader refuses bfloat16 and float8; parse the header and view the
    bytes with ml_dtypes' types (a JAX dependency), bfloat16 widened to float32, float8 kept
    (an FP8 checkpoint's weights, dequantized with their scales by the loader)."""
    dtypes = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
              "F16": np.float16, "F32": np.float32,
              "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            body = f.read()
        out = {}
        for k, meta in header.items():
            if k == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            arr = np.frombuffer(body[a:b], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
            out[k] = arr.astype(np.float32) if meta["dtype"] == "BF16" else arr
        return out
    except Exception as e:
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
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): "
                              f"{e}") from None
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in sd.items()}


def read_weights_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of one safetensors file (and each key's file name, as read_weights)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file")
    tensors = _read_safetensors(Path(path))
    return tensors, {k: Path(path).name for k in tensors}


def read_weights(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor in the folder, and for each key the file it came from (for error messages)."""
    if (folder / SAFETENSORS_FILE).exists():
        files, reader = [folder / SAFETENSORS_FILE], _read_safetensors
    elif (folder / SAFETENSORS_INDEX).exists() or (folder / TORCH_INDEX).exists():
        index = folder / (SAFETENSORS_INDEX if (folder / SAFETENSORS_INDEX).exists()
                          else TORCH_INDEX)
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


# =========================================================================== writing

def write_weights(folder: Path, tensors: dict[str, np.ndarray], config: dict, *,
                  max_shard_bytes: int = 5 << 30) -> Path:
    """config.json and the tensors as safetensors (sharded with an index above the limit)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for k, v in tensors.items():
        if shards[-1] and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    names = ([SAFETENSORS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    # Write every file under a temporary name first, then rename, so a kill mid-write never
    # leaves a half file that looks complete.
    moves = []
    for name, shard in zip(names, shards):
        tmp = folder / (name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        moves.append((tmp, folder / name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        tmp = folder / (SAFETENSORS_INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        moves.append((tmp, folder / SAFETENSORS_INDEX))
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    moves.append((tmp, folder / CONFIG_FILE))
    for src, dst in moves:
        os.replace(src, dst)
    return folder


# =========================================================================== tokenizers

def load_tokenizer(name_or_path: str | os.PathLike):
    """A transformers tokenizer from a local folder, a bucket's folder, the HF cache, or the hub
    (fast offline error)."""
    if storage.is_url(str(name_or_path)):
        name_or_path = storage.fetch(str(name_or_path), "tokenizer_name_or_path")
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    if path.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a tokenizer folder ({e})") from None
    if not name or _is_local_name(name, path):
        raise CheckpointError(f"{name!r}: no such tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise CheckpointError(f"tokenizer {name!r} is not a local folder, is not in the Hugging "
                              f"Face cache, and the hub cannot be reached (offline). Pass a local "
                              "tokenizer folder (config key tokenizer_name_or_path) instead")
    return AutoTokenizer.from_pretrained(name)
