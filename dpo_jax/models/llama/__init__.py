"""The Llama family (HF ``model_type`` llama, mistral, qwen2, qwen3): ``model.py`` the module,
``params.py`` its HF side."""

from dpo_jax.models.llama.model import Llama, LlamaConfig
from dpo_jax.models.llama.params import FAMILY

__all__ = ["FAMILY", "Llama", "LlamaConfig"]
