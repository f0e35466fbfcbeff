"""Full fine-tuning: every parameter trains; the reference is a frozen copy of the initial
policy in buffers of its own (the policy's are donated to the step), in ``ref_dtype`` if set."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import common
from dpo_jax.tuning import Parts, Tuning, register


@register
class FullTuning(Tuning):
    """The policy is ``trainable``; the reference is ``frozen``, its own copy."""

    name = "full"
    trains_base_weights = True
    frees_frozen_after_precompute = True  # the reference is only the reference

    def __init__(self, graphdef, family=None, model_cfg=None, ref_dtype: str = ""):
        super().__init__(family, model_cfg, ref_dtype)
        self.graphdef = graphdef

    @classmethod
    def from_config(cls, cfg, family, model_cfg, *, ref_dtype: str = "") -> "FullTuning":
        return cls(nnx.graphdef(common.abstract(family.model_cls, model_cfg)), family, model_cfg,
                   ref_dtype)

    @classmethod
    def applies(cls, cfg) -> bool:
        return not cfg.lora_rank

    def model(self, trainable, frozen, rng=None):
        return nnx.merge(self.graphdef, trainable)

    def reference(self, trainable, frozen):
        return nnx.merge(self.graphdef, frozen)

    def split(self, mesh, params, *, seed: int) -> Parts:
        abstract = common.abstract(self.family.model_cls, self.model_cfg)
        return Parts(params, self.family.rules, common.decay_mask(abstract), None)

    def frozen_copy(self, state, state_sh) -> dict:
        """The initial policy copied, never updated, so bfloat16 (``ref_dtype``) halves its
        memory at no cost to the policy."""
        dtype = jnp.dtype(self.ref_dtype) if self.ref_dtype else None
        return jax.tree.map(
            lambda a, sh: jax.device_put(a, sh, may_alias=False).astype(dtype or a.dtype),
            state["params"], state_sh["params"])

    def merged_params(self, trainable, frozen) -> dict:
        return trainable

    def trainable_template(self, base_params: dict) -> dict:
        return base_params
