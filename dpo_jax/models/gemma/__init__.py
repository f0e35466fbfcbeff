"""The Gemma family (HF ``model_type`` gemma2, gemma3_text): ``model.py`` the module,
``params.py`` its HF side."""

from dpo_jax.models.gemma.model import Gemma, GemmaConfig
from dpo_jax.models.gemma.params import FAMILY

__all__ = ["FAMILY", "Gemma", "GemmaConfig"]
