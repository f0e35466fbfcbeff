"""The Llama family as a Flax NNX module: Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3 and
Phi-3 / Phi-4-mini.

One module covers the HF ``model_type``s llama, mistral, qwen2, qwen3 and phi3; they differ only in
switches of ``LlamaConfig``: biases on q/k/v (Qwen2) or on every projection (``attention_bias``),
per-head RMSNorm of q and k before RoPE (Qwen3), a ``head_dim`` of its own, a tied or untied LM
head. Parameter names are HF's (``embed_tokens``, ``layers.self_attn.q_proj``, ``norm``) with
the layers stacked and scanned, except that an untied head is ``head.weight`` (HF's
``lm_head.weight``: ``lm_head`` is the contract's method here); matrices are stored (in, out),
the transpose of ``nn.Linear``'s (out, in), which the name table (``params.py``) handles.

Numerics follow transformers' ``LlamaForCausalLM``: RMSNorm in float32, cast to the compute dtype
before the scale; rotary embeddings in HF's rotate-half layout from the position ids, their
cos / sin computed in float32 (``rope_type`` default, ``linear``, ``llama3`` or ``longrope``),
on the first ``partial_rotary_factor`` of each head (Phi-4-mini);
grouped-query attention with a float32 softmax; a SwiGLU MLP ``down(silu(gate(x)) * up(x))``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import common
from dpo_jax.models.trunk import CausalLM

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(common.HFLayout, common.ComputeOptions):
    """Architecture (the fields of HF's Llama / Mistral / Qwen2 / Qwen3 configs that change the
    math), then compute options (``common.ComputeOptions``, first by dataclass inheritance)."""

    model_type: str = "llama"       # llama | mistral | qwen2 | qwen3 (kept for the export)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"      # default | linear | llama3
    rope_factor: float = 1.0        # linear and llama3
    rope_low_freq_factor: float = 1.0    # llama3
    rope_high_freq_factor: float = 4.0   # llama3
    rope_original_max_position_embeddings: int = 8192  # llama3
    attention_bias: bool = False    # biases on q, k, v and o (Llama's option; Qwen3's)
    qkv_bias: bool = False          # biases on q, k, v only (Qwen2)
    qk_norm: bool = False           # RMSNorm of each head of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # attention window; runs only where it never applies
    partial_rotary_factor: float = 1.0  # RoPE on this share of each head (Phi-4-mini: 0.75)
    rope_short_factor: tuple = ()       # longrope (Phi-3 128k, Phi-4-mini): per-frequency
    rope_long_factor: tuple = ()        # longrope: past the original length (kept for export)
    rope_attention_factor: float = 1.0  # longrope: cos / sin scaled by this
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        self.check_compute()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")

    @property
    def max_positions(self) -> int:
        return min(self.length_limits().values())

    def length_limits(self) -> dict[str, int]:
        """The sequence-length limits, by config field (a clear error names the one exceeded)."""
        limits = {"max_position_embeddings": self.max_position_embeddings}
        if self.sliding_window is not None:  # within the window, attention is plain causal
            limits["sliding_window"] = self.sliding_window
        if self.rope_type == "longrope":  # past it transformers switches to the long factors
            limits["rope original_max_position_embeddings (longrope's short factors)"] = \
                self.rope_original_max_position_embeddings
        return limits

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def tensor_parallel_dims(self) -> dict[str, int]:
        return {"num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "intermediate_size": self.intermediate_size, "hidden_size": self.hidden_size}

    def inv_freq(self) -> np.ndarray:
        """RoPE's inverse frequencies (head_dim / 2,), float32, as transformers computes them."""
        if self.rope_type == "longrope":  # the short factors (the length limit keeps to them)
            d = self.rotary_dim
            base = self.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)
            return (1.0 / (np.asarray(self.rope_short_factor, np.float32) * base)
                    ).astype(np.float32)
        return rope_inv_freq(self.rotary_dim, self.rope_type, self.rope_theta, self.rope_factor,
                             self.rope_low_freq_factor, self.rope_high_freq_factor,
                             self.rope_original_max_position_embeddings)


def rope_inv_freq(d: int, rope_type: str, theta: float, factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_positions: int = 8192) -> np.ndarray:
    """RoPE's inverse frequencies (d / 2,), float32, as transformers computes them for
    ``rope_type`` default, linear and llama3."""
    inv = (1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
           ).astype(np.float32)
    if rope_type == "linear":
        inv = inv / np.float32(factor)
    elif rope_type == "llama3":
        old = original_max_positions
        low_wavelen = old / low_freq_factor
        high_wavelen = old / high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope(position_ids, inv_freq, dtype):
    """(cos, sin), each (B, T, head_dim) in the compute dtype, from float32 position angles."""
    freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_bthd, cos, sin):
    """HF's rotate-half layout: x * cos + rotate_half(x) * sin, per head; on the first
    cos.shape[-1] dims of each head where the rotary part is partial (the rest pass)."""
    if cos.shape[-1] < x_bthd.shape[-1]:
        d = cos.shape[-1]
        return jnp.concatenate([apply_rope(x_bthd[..., :d], cos, sin), x_bthd[..., d:]], -1)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos[:, :, None] + rotated * sin[:, :, None]


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt, c, d = cfg.compute_dtype, cfg.hidden_size, cfg.head_dim
        h, k = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        lin = lambda n_in, n_out, bias: common.Linear(n_in, n_out, std=0.02, dtype=dt, rngs=rngs,
                                                      bias=bias)
        self.q_proj = lin(c, h * d, qkv_bias)
        self.k_proj = lin(c, k * d, qkv_bias)
        self.v_proj = lin(c, k * d, qkv_bias)
        self.o_proj = lin(h * d, c, cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = common.RMSNorm(d, cfg.rms_norm_eps, dt)
            self.k_norm = common.RMSNorm(d, cfg.rms_norm_eps, dt)
        self.qk_norm = cfg.qk_norm
        self.heads, self.kv_heads, self.head_dim = h, k, d
        self.implementation, self.mesh_axes = cfg.attention, cfg.mesh_axes

    def queries_keys(self, x):
        """q (B, T, H, D) and k (B, T, K, D) before RoPE: projected, split into heads, and
        normalized per head where the config says (Qwen3). A family that normalizes otherwise
        (OLMoE: the whole projection) overrides this."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def __call__(self, x, mask_bts, context, per_layer, kv=None, index=None):
        cos, sin = context  # RoPE's, from the positions
        b, t, _ = x.shape
        q, k = self.queries_keys(x)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y, kv = common.attention(q, k, v, mask_bts, scale=self.head_dim ** -0.5,
                                 implementation=self.implementation, kv=kv, index=index,
                                 mesh_axes=self.mesh_axes)
        return self.o_proj(y.reshape(b, t, self.heads * self.head_dim)), kv


class DecoderLayer(common.PreNormBlock):
    """Pre-norm: x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        norm = lambda: common.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = common.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.compute_dtype,
                                   jax.nn.silu, rngs=rngs)
        self.mlp_tile, self.mesh_axes = cfg.mlp_tile, cfg.mesh_axes

    def parts(self):
        return self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp



class Llama(CausalLM):
    """``LlamaForCausalLM`` and its relatives (see the module docstring)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = common.Embedding(config.vocab_size, config.hidden_size, rngs=rngs)
        self.layers = common.stacked(lambda r: DecoderLayer(config, rngs=r),
                                     config.num_hidden_layers, rngs)
        self.norm = common.RMSNorm(config.hidden_size, config.rms_norm_eps, config.compute_dtype)
        if not config.tie_word_embeddings:
            self.head = common.Head(config.vocab_size, config.hidden_size, rngs=rngs)

    @property
    def stack(self):
        return self.layers

    def embed(self, input_ids, position_ids):
        return self.embed_tokens(input_ids).astype(self.config.compute_dtype)

    def block_context(self, position_ids):
        c = self.config
        if c.rope_type == "longrope":  # cos / sin scaled by the attention factor
            cos, sin = rope(position_ids, c.inv_freq(), jnp.float32)
            f = np.float32(c.rope_attention_factor)
            return (cos * f).astype(c.compute_dtype), (sin * f).astype(c.compute_dtype)
        return rope(position_ids, c.inv_freq(), c.compute_dtype)  # (cos, sin)

    def final_norm(self, x):
        return self.norm(x)

    def head_weight(self):
        """The LM head's (V, C) matrix: the token embedding when tied, ``head`` when not."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.weight[...]
        return self.head.weight[...]
