"""The mixture-of-experts family (HF ``model_type`` qwen3_moe, mixtral, olmoe): ``model.py`` the
module, ``params.py`` its HF side, ``aux.py`` the router's load-balancing loss."""

from dpo_jax.models.moe.model import MoE, MoEConfig
from dpo_jax.models.moe.params import FAMILY

__all__ = ["FAMILY", "MoE", "MoEConfig"]
