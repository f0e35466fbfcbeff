"""DoRA (Liu et al. 2024, arXiv 2402.09353; config key ``use_dora=True`` with ``lora_rank``, PEFT's
and TRL's name): each adapted matrix is a trained magnitude per output times the direction of
``W + scale A B``, the column norm taken as a constant (the paper's section 4.3, as PEFT):

    y = m / ||W + s A B||_c * (x W + s x A B) + bias

with ``m`` initialized to ||W||_c, so at step 0 (B = 0) the policy is the base exactly. With
dropout, PEFT's form: ``x W + bias + (m/n - 1) d(x) W + (m/n) s d(x) A B``. Everything else
(targets, the base as the reference, sharding, checkpoints, PEFT export) is LoRA's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from dpo_jax import models, sharding
from dpo_jax.models import common
from dpo_jax.tuning import register
from dpo_jax.tuning.lora import LoRALinear, LoRATuning, _spec_of


def column_norm(w, a, b, scale):
    """||W + scale A B|| over the input axis, per output: (..., out), float32."""
    merged = w.astype(jnp.float32) + scale * jnp.matmul(a, b)
    return jnp.sqrt(jnp.sum(jnp.square(merged), axis=-2))


class DoRALinear(LoRALinear):
    """LoRA's wrapper plus ``lora_magnitude`` (out,)."""

    def __init__(self, base, cfg, a, b, dropout: bool):
        super().__init__(base, cfg, a, b, dropout)
        self.lora_magnitude = nnx.LoRAParam(jnp.ones(b.shape[:-2] + b.shape[-1:], jnp.float32))

    def project(self, x2):
        norm = jax.lax.stop_gradient(column_norm(
            self.weight[...], self.lora_a[...], self.lora_b[...], self.lora_scale))
        ratio = (self.lora_magnitude[...] / norm).astype(self.dtype)
        h2 = self.adapter_input(x2)
        base = common.project(self, h2, bias=False)
        y = ratio * (base + self.delta(h2))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_dropout:  # the undropped input's base output, PEFT's form
            y = y + common.project(self, x2, bias=False) - base
        return y


@register
class DoRATuning(LoRATuning):
    name = "dora"
    wrapper = DoRALinear

    @classmethod
    def applies(cls, cfg) -> bool:
        return bool(cfg.lora_rank) and cfg.use_dora

    def init_trainable(self, mesh, seed, base, rules):
        """LoRA's fresh adapters, and each magnitude set to its base matrix's column norm."""
        adapters = super().init_trainable(mesh, seed, base, rules)
        weights = {p: models.flatten(base)[f"{p}.weight"] for p in self.paths}

        def magnitudes(adapters, weights):
            flat = dict(models.flatten(adapters))
            for path in self.paths:
                flat[f"{path}.lora_magnitude"] = column_norm(
                    weights[path][...], flat[f"{path}.lora_a"], flat[f"{path}.lora_b"],
                    self.cfg.scale)
            return models.unflatten_like(adapters, flat)

        shardings = sharding.named(mesh, sharding.param_specs(adapters, rules))
        return jax.jit(magnitudes, out_shardings=shardings)(adapters, weights)

    def rules(self, base_rules) -> list:
        """LoRA's, and each magnitude split as its matrix's output axis."""
        out = super().rules(base_rules)
        for path in self.paths:
            spec = _spec_of(f"{path}.weight", base_rules)
            out.append((f"{path}.lora_magnitude".replace(".", r"\."), P(*spec[:-2], spec[-1])))
        return out

    def merged_weight(self, w, adapters, path):
        """m / ||W + s A B||_c * (W + s A B), as PEFT merges."""
        merged = super().merged_weight(w, adapters, path)
        norm = np.sqrt(np.sum(np.square(merged), axis=-2, keepdims=True))
        m = np.asarray(adapters[f"{path}.lora_magnitude"], np.float32)[..., None, :]
        return merged * (m / norm)

    def peft_tensors(self):
        return super().peft_tensors() + [("lora_magnitude_vector", "lora_magnitude", False)]

    def peft_config(self) -> dict:
        return {"use_dora": True}
