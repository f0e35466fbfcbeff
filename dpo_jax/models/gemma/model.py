"""The Gemma family as a Flax NNX module: Gemma 2 and Gemma 3 (text).

Numerics follow transformers' ``Gemma2ForCausalLM`` and ``Gemma3ForCausalLM``:

- RMSNorm with a ``(1 + w)`` scale applied in float32, then cast (the weights are stored as w,
  zero at init); four norms per block, around attention and around the MLP ("sandwich");
- token embeddings scaled by sqrt(hidden_size); a GeGLU MLP ``down(gelu_tanh(gate(x)) * up(x))``;
- attention scaled by ``query_pre_attn_scalar ** -0.5``, with a ``head_dim`` of its own; Gemma 3
  normalizes each head of q and k before RoPE; Gemma 2 soft-caps the attention logits
  (``attn_logit_softcapping``) and, at the output hook, the final logits
  (``final_logit_softcapping``);
- local layers (``layer_types`` ``sliding_attention``) attend within ``sliding_window`` positions
  (a query at position p sees keys at positions > p - window): the window is on positions, so it
  holds in every layout, prefix sharing's rejected tokens and packed segments included, and in
  the KV-cache sampler; Gemma 3's local layers take RoPE with their own base
  (``rope_local_base_freq``), its global layers the global base and its scaling.

Which layers are local is a scanned per-layer input, so the stack still compiles one block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import common
from dpo_jax.models.attention import Mask, as_mask
from dpo_jax.models.llama.model import ROPE_TYPES, apply_rope, rope, rope_inv_freq
from dpo_jax.models.trunk import CausalLM


@dataclasses.dataclass(frozen=True)
class GemmaConfig(common.HFLayout, common.ComputeOptions):
    """Architecture (the fields of HF's Gemma2Config / Gemma3TextConfig that change the math),
    then compute options (``common.ComputeOptions``, first by dataclass inheritance)."""

    model_type: str = "gemma2"       # gemma2 | gemma3_text (kept for the export)
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = 4096
    local_layers: tuple[bool, ...] = ()   # per layer: sliding_attention (True) or full
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qk_norm: bool = False            # Gemma 3
    attention_bias: bool = False
    rope_theta: float = 10000.0      # global layers
    rope_type: str = "default"       # global layers: default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rope_local_theta: float = 10000.0  # local layers (default rope)
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int | tuple = 1

    def __post_init__(self):
        self.check_compute()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")
        if len(self.local_layers) != self.num_hidden_layers:
            raise ValueError(f"layer_types names {len(self.local_layers)} layers, the model has "
                             f"num_hidden_layers={self.num_hidden_layers}")
        if any(self.local_layers) and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is "
                             f"{self.sliding_window!r}")

    # the model contract (the sizes: common.HFLayout)
    @property
    def final_logit_softcap(self):
        return self.final_logit_softcapping

    @property
    def windowed(self) -> bool:
        return any(self.local_layers)

    @property
    def attention_needs(self) -> tuple[str, ...]:
        """What this attention has that the fused kernels here do not take (plan.compute)."""
        return tuple(n for n, on in (("a sliding window", self.windowed),
                                     ("soft-capped logits", bool(self.attn_logit_softcapping)))
                     if on)

    def length_limits(self) -> dict[str, int]:
        return {"max_position_embeddings": self.max_position_embeddings}

    def tensor_parallel_dims(self) -> dict[str, int]:
        return {"num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "intermediate_size": self.intermediate_size, "hidden_size": self.hidden_size}

    def inv_freq(self, local: bool = False) -> np.ndarray:
        if local:
            return rope_inv_freq(self.head_dim, "default", self.rope_local_theta)
        return rope_inv_freq(self.head_dim, self.rope_type, self.rope_theta, self.rope_factor,
                             self.rope_low_freq_factor, self.rope_high_freq_factor,
                             self.rope_original_max_position_embeddings)


class RMSNorm(nnx.Module):
    """Gemma's RMS norm: normalize and scale by (1 + w) in float32, then cast."""

    def __init__(self, n: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.zeros((n,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...])).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        dt, c, d = cfg.compute_dtype, cfg.hidden_size, cfg.head_dim
        h, k = cfg.num_attention_heads, cfg.num_key_value_heads
        lin = lambda n_in, n_out: common.Linear(n_in, n_out, std=0.02, dtype=dt, rngs=rngs,
                                                bias=cfg.attention_bias)
        self.q_proj, self.k_proj = lin(c, h * d), lin(c, k * d)
        self.v_proj, self.o_proj = lin(c, k * d), lin(h * d, c)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dt)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dt)
        self.qk_norm = cfg.qk_norm
        self.heads, self.kv_heads, self.head_dim = h, k, d
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.windowed, self.window = cfg.windowed, cfg.sliding_window
        self.implementation, self.mesh_axes = cfg.attention, cfg.mesh_axes

    def __call__(self, x, masks, context, per_layer, kv=None, index=None):
        (local,) = per_layer
        cos_g, sin_g, cos_l, sin_l = context
        cos, sin = jnp.where(local, cos_l, cos_g), jnp.where(local, sin_l, sin_g)
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        run = functools.partial(common.attention, scale=self.scale, kv=kv, index=index,
                                softcap=self.softcap, mesh_axes=self.mesh_axes)
        if not self.windowed:
            y, kv = run(q, k, v, masks, implementation=self.implementation)
        elif self.implementation == "splash" and kv is None:  # the kernel's own local mask
            glob = masks[0]
            y, kv = jax.lax.cond(
                local, lambda: run(q, k, v, glob, implementation="splash",
                                   window=self.window),
                lambda: run(q, k, v, glob, implementation="splash"))
        else:  # this layer's dense mask: the sequence's, or its windowed form
            mask = Mask.per_layer(*masks, local)
            y, kv = run(q, k, v, mask, implementation=self.implementation)
        return self.o_proj(y.reshape(b, t, self.heads * self.head_dim)), kv


class DecoderLayer(nnx.Module):
    """x + post_attention_norm(attn(input_norm(x))), then
    x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))."""

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = common.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.compute_dtype,
                                   common.gelu_tanh, rngs=rngs)
        self.post_feedforward_layernorm = norm()
        self.mlp_tile, self.mesh_axes = cfg.mlp_tile, cfg.mesh_axes

    def __call__(self, x, masks, context, per_layer, kv=None, index=None):
        a, kv = self.self_attn(self.input_layernorm(x), masks, context, per_layer, kv, index)
        x = x + self.post_attention_layernorm(a)
        mlp = lambda h: self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return x + common.feed_forward(mlp, x, self.mlp_tile, self.mesh_axes), kv



class Gemma(CausalLM):
    """``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` (see the module docstring)."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = common.Embedding(config.vocab_size, config.hidden_size, rngs=rngs)
        self.layers = common.stacked(lambda r: DecoderLayer(config, rngs=r),
                                     config.num_hidden_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.compute_dtype)
        if not config.tie_word_embeddings:
            self.head = common.Head(config.vocab_size, config.hidden_size, rngs=rngs)

    @property
    def stack(self):
        return self.layers

    def embed(self, input_ids, position_ids):
        x = self.embed_tokens(input_ids)
        return (x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)).astype(
            self.config.compute_dtype)

    def block_context(self, position_ids):
        c = self.config
        return (*rope(position_ids, c.inv_freq(), c.compute_dtype),
                *rope(position_ids, c.inv_freq(local=True), c.compute_dtype))

    def layer_inputs(self):
        return (jnp.asarray(self.config.local_layers, bool),)

    def layer_masks(self, mask, query_positions, key_positions):
        if not self.config.windowed:
            return mask
        w = self.config.sliding_window
        near = query_positions[:, :, None] - key_positions[:, None, :] < w
        mask = as_mask(mask)
        rule = mask.rule  # a training pass's rule: queries and keys are the same positions
        if rule is not None and query_positions is key_positions:
            rule = rule.windowed(query_positions, w)
        else:
            rule = None
        return mask, Mask(mask.dense & near, rule=rule, causal=True)

    def final_norm(self, x):
        return self.norm(x)

    def head_weight(self):
        if self.config.tie_word_embeddings:
            return self.embed_tokens.weight[...]
        return self.head.weight[...]
