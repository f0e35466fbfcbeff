"""GPT-2 as a Flax NNX module with Hugging Face semantics.

Parameter names are GPT-2's own (``wte``, ``wpe``, ``h.{i}.attn.c_attn``, ``ln_f``...) and every
parameter is stored in HF's layout, so importing a checkpoint is a table of identical names (see
``hf.py``). Parameters are float32; ``GPT2Config.dtype`` is the compute dtype (float32 or
bfloat16). Layer norms, attention softmax and logits are computed in float32 whatever it is.

The module knows nothing about DPO: ``hidden_states`` runs the trunk, ``lm_head`` maps hidden
states to logits, and ``__call__`` is the two together. Log-prob code (``logprobs.py``) calls the
head itself, only where it needs it and in chunks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = {
    # GPT-2's "gelu_new" is the tanh approximation of GELU.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a rematerialized block keeps for the backward pass (jax.checkpoint_policies):
_REMAT = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # recompute all: least memory
    "dots_saveable": jax.checkpoint_policies.dots_saveable,        # keep matmul outputs
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture (the fields of HF's GPT2Config that change the math) plus compute options."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd, as in HF
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # Compute options, not architecture: they are not written to config.json.
    dtype: str = "float32"  # compute dtype of matmuls and activations; params stay float32
    remat: bool = False     # recompute each block's activations in the backward pass
    remat_policy: str = "nothing_saveable"  # what a rematerialized block keeps (see _REMAT)

    def __post_init__(self):
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"valid: {sorted(_ACTIVATIONS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; valid: {sorted(_DTYPES)}")
        if self.remat_policy not in _REMAT:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not supported; valid: "
                             f"{sorted(_REMAT)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]


def _normal(rngs: nnx.Rngs, shape, std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Conv1D(nnx.Module):
    """HF's Conv1D: ``y = x @ weight + bias`` with ``weight`` stored (in, out).

    This is the transpose of ``torch.nn.Linear``'s (out, in) layout; GPT-2 checkpoints store it
    this way, so they load here with no transpose.
    """

    def __init__(self, n_in: int, n_out: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (n_in, n_out), std))
        self.bias = nnx.Param(jnp.zeros((n_out,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x):
        # Flatten (B, T) so the matmul and its weight gradient are plain 2-D GEMMs: XLA runs the
        # weight gradient of a 3-D dot noticeably slower on CPU.
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]), self.weight[...].astype(self.dtype))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(*lead, y.shape[-1])


class LayerNorm(nnx.Module):
    """Layer norm computed in float32 (bfloat16 statistics lose too much), cast back after."""

    def __init__(self, n: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((n,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((n,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, n: int, d: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (n, d), 0.02))

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd, std=0.02, dtype=dt, rngs=rngs)
        # GPT-2 scales residual projections at init by 1/sqrt(2 * n_layer).
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd, std=0.02 / math.sqrt(2 * cfg.n_layer),
                             dtype=dt, rngs=rngs)
        self.n_head = cfg.n_head
        self.scale = 1.0 / math.sqrt(cfg.n_embd // cfg.n_head) if cfg.scale_attn_weights else 1.0
        self.by_layer = cfg.scale_attn_by_inverse_layer_idx

    def __call__(self, x_btc, mask_bts, layer_idx, kv=None, index=None):
        """mask_bts: (B, T, S) True where query t may attend to key s. layer_idx: this layer's
        index (traced under the layer scan). With ``kv``, a (k, v) cache of (B, S, H, D) arrays,
        the new keys and values are written at ``index`` and attention runs over the whole
        cache; the updated cache is returned."""
        b, t, c = x_btc.shape
        q, k, v = jnp.split(self.c_attn(x_btc), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.n_head, c // self.n_head) for a in (q, k, v))
        if kv is not None:
            at = (0, index, 0, 0)
            kv = (jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), at),
                  jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), at))
            k, v = kv
        # jax.nn.dot_product_attention takes the logits and softmax to float32 for bfloat16
        # inputs, and on GPU can dispatch to a fused (cuDNN) kernel.
        if self.by_layer:  # GPT-2 variant option: scale by 1 / (layer_idx + 1) as well
            q = q / (layer_idx + 1).astype(q.dtype)
        y = jax.nn.dot_product_attention(q, k, v, mask=mask_bts[:, None], scale=self.scale)
        return self.c_proj(y.reshape(b, t, c)), kv


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.c_fc = Conv1D(cfg.n_embd, cfg.d_ff, std=0.02, dtype=dt, rngs=rngs)
        self.c_proj = Conv1D(cfg.d_ff, cfg.n_embd, std=0.02 / math.sqrt(2 * cfg.n_layer),
                             dtype=dt, rngs=rngs)
        self.act = cfg.activation_function

    def __call__(self, x):
        return self.c_proj(_ACTIVATIONS[self.act](self.c_fc(x)))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dt)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, mask_bts, layer_idx, kv=None, index=None):
        a, kv = self.attn(self.ln_1(x), mask_bts, layer_idx, kv, index)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


def positions_from_mask(attention_mask_bt):
    """Position ids that count only real tokens, so left padding does not shift positions.

    Padding positions get 0 (their outputs are never read).
    """
    return jnp.maximum(jnp.cumsum(attention_mask_bt, axis=-1) - 1, 0).astype(jnp.int32)


class GPT2(nnx.Module):
    """GPT-2 LM (HF ``GPT2LMHeadModel``) with the LM head tied to the token embedding ``wte``.

    The blocks are stacked: ``h`` is one Block whose params carry a leading layer axis
    (``h.attn.c_attn.weight`` is (n_layer, C, 3C); HF's ``h.{i}.attn.c_attn.weight`` is its
    slice i), and the trunk is a ``lax.scan`` over it. One block is compiled instead of n_layer,
    and rematerialization really bounds memory: under a scan, the backward pass recomputes one
    block at a time whatever the backend's scheduler does (an unrolled, checkpointed stack kept
    nothing off XLA's CPU peak).
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = Embedding(config.vocab_size, config.n_embd, rngs=rngs)
        self.wpe = Embedding(config.n_positions, config.n_embd, rngs=rngs)

        @nnx.split_rngs(splits=config.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs):
            return Block(config, rngs=rngs)

        self.h = stacked_blocks(rngs)
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, config.compute_dtype)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *, attn_mask=None):
        """Final (post ``ln_f``) hidden states, (B, T, C) in the compute dtype.

        attention_mask: (B, T), 1 for real tokens, 0 for padding (left or right). Position ids are
          derived from it unless given, so a left-padded row gives the logits of the unpadded one.
        attn_mask: optional (B, T, T) boolean, True where query t may attend to key s. It replaces
          the causal-and-padding mask (used for layouts such as prefix sharing).
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        if attn_mask is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            attn_mask = causal[None] & attention_mask.astype(bool)[:, None, :]
        return self._trunk(input_ids, position_ids, attn_mask)[0]

    def _trunk(self, input_ids, position_ids, mask_bts, cache=None, index=None):
        x = (self.wte(input_ids) + self.wpe(position_ids)).astype(self.config.compute_dtype)
        graphdef, stacked = nnx.split(self.h)
        layers = jnp.arange(self.config.n_layer)

        if cache is None:
            def body(x, layer):
                params, i = layer
                return nnx.merge(graphdef, params)(x, mask_bts, i)[0], None
            if self.config.remat:
                body = jax.checkpoint(body, policy=_REMAT[self.config.remat_policy])
            x, _ = jax.lax.scan(body, x, (stacked, layers))
            return self.ln_f(x), None

        def decode_body(x, layer):
            params, i, k, v = layer
            x, kv = nnx.merge(graphdef, params)(x, mask_bts, i, (k, v), index)
            return x, kv
        x, (k, v) = jax.lax.scan(decode_body, x, (stacked, layers, *cache))
        return self.ln_f(x), (k, v)

    def init_cache(self, batch: int, length: int):
        """An empty KV cache: (k, v), each (n_layer, B, S, H, D) in the compute dtype."""
        c = self.config
        shape = (c.n_layer, batch, length, c.n_head, c.n_embd // c.n_head)
        return jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype)

    def decode(self, input_ids, position_ids, key_mask, cache, index):
        """New tokens (B, T) at cache positions [index, index + T) against a KV cache.

        key_mask: (B, S) which cache positions hold real tokens (False for left padding).
        Returns (hidden (B, T, C), updated cache).
        """
        t, s = input_ids.shape[1], key_mask.shape[1]
        causal = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]  # (T, S)
        mask = causal[None] & key_mask.astype(bool)[:, None, :]
        return self._trunk(input_ids, position_ids, mask, cache, index)

    def lm_head(self, hidden):
        """Logits in float32 from hidden states (..., C): the matmul runs in the compute dtype with
        float32 accumulation, so a following log-softmax sees full-precision logits."""
        w = self.wte.weight[...].astype(hidden.dtype)
        return jnp.einsum("...c,vc->...v", hidden, w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, attn_mask=None):
        """Logits (B, T, V), float32."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids,
                                               attn_mask=attn_mask))


def abstract_model(config: GPT2Config) -> GPT2:
    """The module with ShapeDtypeStructs for params: its structure, shapes and graphdef, free."""
    return nnx.eval_shape(lambda: GPT2(config, rngs=nnx.Rngs(0)))


def init_model(config: GPT2Config, seed: int = 0) -> GPT2:
    """A randomly initialized GPT-2 (HF's init: N(0, 0.02), residual projections scaled)."""
    return GPT2(config, rngs=nnx.Rngs(seed))
