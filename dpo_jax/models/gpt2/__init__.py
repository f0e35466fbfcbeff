"""GPT-2 (HF ``model_type`` "gpt2"): ``model.py`` the module, ``params.py`` its HF side."""

from dpo_jax.models.gpt2.model import GPT2, GPT2Config
from dpo_jax.models.gpt2.params import FAMILY

__all__ = ["FAMILY", "GPT2", "GPT2Config"]
