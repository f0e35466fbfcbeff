"""How a run's params split into trainable and frozen parts: full fine-tuning or LoRA.

``steps.py`` takes ``loss_fn(trainable, frozen, batch)`` and a *tuning* that assembles the policy
(``model(trainable, frozen, rng)``) and the reference (``reference(trainable, frozen)``):

- ``FullTuning``: trainable = the policy's params; frozen = the reference's own copy (a second
  buffer, in ``ref_dtype``; {} when the loss needs no reference or once it is precomputed).
- ``lora.LoRATuning``: trainable = the adapters; frozen = the base, which with the adapters
  switched off is the reference: one copy of the base.

``split`` picks one from the config and returns what the trainer places and restores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax import checkpoint, lora, sharding
from dpo_jax.models import common


class FullTuning:
    """Full fine-tuning: the policy is ``trainable``; the reference is ``frozen``, its own copy."""

    frees_frozen_after_precompute = True  # the reference is only the reference

    def __init__(self, graphdef):
        self.graphdef = graphdef

    def model(self, trainable, frozen, rng=None):
        return nnx.merge(self.graphdef, trainable)

    def reference(self, trainable, frozen):
        return nnx.merge(self.graphdef, frozen)


@dataclasses.dataclass
class Split:
    tuning: object       # FullTuning | lora.LoRATuning
    trainable: dict      # params to place as the train state's (host or device arrays)
    rules: tuple         # sharding rules of the trainable params
    decay_mask: dict     # where weight decay applies (optim.build)
    frozen: dict | None  # LoRA's placed base; None for full tuning (see reference_copy)
    lora_record: dict | None  # LoRA's settings and base checksum (checkpoints must match)


def split(config, mesh, family, model_cfg, params) -> Split:
    """The split a run config asks for (``lora_rank`` > 0: LoRA), from the initial params."""
    if not config.lora_rank:
        return Split(FullTuning(nnx.graphdef(common.abstract(family.model_cls, model_cfg))),
                     params, family.rules,
                     common.decay_mask(common.abstract(family.model_cls, model_cfg)), None, None)
    tuning = lora.LoRATuning(family, model_cfg, lora.LoRAConfig.from_config(config, family))
    rules = tuning.rules(family.rules)
    trainable = (lora.load_peft(config.lora_init, tuning) if config.lora_init else
                 sharding.init_params(mesh, tuning.init_adapters(config.seed), rules))
    dtype = jnp.dtype(config.ref_dtype) if config.ref_dtype else None
    base = jax.tree.map(lambda a: a.astype(dtype or a.dtype), sharding.place(
        params, sharding.named(mesh, sharding.param_specs(params, family.rules))))
    record = {**tuning.cfg.record(), "base": np.asarray(checkpoint.checksum(base)).tolist()}
    return Split(tuning, trainable, rules, jax.tree.map(lambda _: True, trainable), base, record)


def reference_copy(state, state_sh, ref_dtype: str) -> dict:
    """Full tuning's reference: the initial policy in buffers of its own (the policy's are
    donated to the step), in ``ref_dtype`` if set: never updated, so bfloat16 halves its memory
    at no cost to the policy."""
    dtype = jnp.dtype(ref_dtype) if ref_dtype else None
    return jax.tree.map(
        lambda a, sh: jax.device_put(a, sh, may_alias=False).astype(dtype or a.dtype),
        state["params"], state_sh["params"])
