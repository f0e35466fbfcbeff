"""GPT-2 as a Flax NNX module with Hugging Face semantics (HF ``GPT2LMHeadModel``).

Parameter names are GPT-2's own (``wte``, ``wpe``, ``h.attn.c_attn``, ``ln_f``...) and every
parameter is stored in HF's layout (HF's ``Conv1D`` keeps weights (in, out), as ``Linear`` does),
so importing a checkpoint is a table of identical names (``params.py``). Parameters are float32;
``GPT2Config.dtype`` is the compute dtype. Layer norms, attention softmax and logits are computed
in float32 whatever it is.

The module knows nothing about DPO: ``hidden_states`` runs the trunk, ``lm_head`` maps hidden
states to logits, and ``__call__`` is the two together. Log-prob code (``logprobs.py``) takes the
head matrix (``head_weight``) and runs it itself, only where it needs it and in chunks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import common

ACTIVATIONS = {
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


@dataclasses.dataclass(frozen=True)
class GPT2Config(common.ComputeOptions):
    """Architecture (the fields of HF's GPT2Config that change the math), then compute options.

    The compute options (dtype, remat, remat_policy, attention: ``common.ComputeOptions``) come
    first only because dataclass inheritance puts them there; every field has a default."""

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

    def __post_init__(self):
        self.check_compute()
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"valid: {sorted(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def max_positions(self) -> int:
        return self.n_positions

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def length_limits(self) -> dict[str, int]:
        return {"n_positions": self.n_positions}

    @property
    def n_layers(self) -> int:
        return self.n_layer

    def tensor_parallel_dims(self) -> dict[str, int]:
        """The sizes the tensor axis splits, by config field (for a clear mesh error)."""
        return {"n_head": self.n_head, "n_inner (MLP width)": self.d_ff, "n_embd": self.n_embd}


Conv1D = common.Linear  # HF GPT-2's name for a Linear stored (in, out)


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
        self.implementation = cfg.attention

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
        if self.by_layer:  # GPT-2 variant option: scale by 1 / (layer_idx + 1) as well
            q = q / (layer_idx + 1).astype(q.dtype)
        y = common.attention(q, k, v, mask_bts, scale=self.scale,
                             implementation="xla" if kv is not None else self.implementation)
        return self.c_proj(y.reshape(b, t, c)), kv


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.c_fc = Conv1D(cfg.n_embd, cfg.d_ff, std=0.02, dtype=dt, rngs=rngs)
        self.c_proj = Conv1D(cfg.d_ff, cfg.n_embd, std=0.02 / math.sqrt(2 * cfg.n_layer),
                             dtype=dt, rngs=rngs)
        self.act = cfg.activation_function

    def __call__(self, x):
        return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x)))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.ln_1 = common.LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dt)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = common.LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, mask_bts, layer_idx, kv=None, index=None):
        a, kv = self.attn(self.ln_1(x), mask_bts, layer_idx, kv, index)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT2(nnx.Module):
    """GPT-2 LM (HF ``GPT2LMHeadModel``) with the LM head tied to the token embedding ``wte``.

    The blocks are stacked: ``h`` is one Block whose params carry a leading layer axis
    (``h.attn.c_attn.weight`` is (n_layer, C, 3C); HF's ``h.{i}.attn.c_attn.weight`` is its
    slice i), and the trunk is a scan over it (``common.scan_stack``).
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = common.Embedding(config.vocab_size, config.n_embd, rngs=rngs)
        self.wpe = common.Embedding(config.n_positions, config.n_embd, rngs=rngs)
        self.h = common.stacked(lambda r: Block(config, rngs=r), config.n_layer, rngs)
        self.ln_f = common.LayerNorm(config.n_embd, config.layer_norm_epsilon,
                                     config.compute_dtype)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *, attn_mask=None):
        """Final (post ``ln_f``) hidden states, (B, T, C) in the compute dtype.

        attention_mask: (B, T), 1 for real tokens, 0 for padding (left or right). Position ids are
          derived from it unless given, so a left-padded row gives the logits of the unpadded one.
        attn_mask: optional ``attention.Mask`` (lengths, segments or a dense (B, T, T) boolean,
          True where query t may attend to key s). It replaces the causal-and-padding mask
          (layouts such as prefix sharing and packing pass their own).
        """
        position_ids, attn_mask = common.trunk_inputs(input_ids, attention_mask, position_ids,
                                                      attn_mask)
        return self._trunk(input_ids, position_ids, attn_mask)[0]

    def _trunk(self, input_ids, position_ids, mask_bts, cache=None, index=None):
        c = self.config
        x = (self.wte(input_ids) + self.wpe(position_ids)).astype(c.compute_dtype)
        layers = jnp.arange(c.n_layer)
        if cache is None:
            x, _ = common.scan_stack(self.h, x, lambda blk, x, i: (blk(x, mask_bts, i)[0], None),
                                     (layers,), remat=c.remat, remat_policy=c.remat_policy)
            return self.ln_f(x), None
        x, kv = common.scan_stack(
            self.h, x, lambda blk, x, i, k, v: blk(x, mask_bts, i, (k, v), index),
            (layers, *cache))
        return self.ln_f(x), kv

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
        mask = common.decode_mask(key_mask, input_ids.shape[1], index)
        return self._trunk(input_ids, position_ids, mask, cache, index)

    def head_weight(self):
        """The LM head's (V, C) matrix: tied to the token embedding."""
        return self.wte.weight[...]

    def lm_head(self, hidden):
        """Logits in float32 from hidden states (..., C): the matmul runs in the compute dtype with
        float32 accumulation, so a following log-softmax sees full-precision logits."""
        w = self.head_weight().astype(hidden.dtype)
        return jnp.einsum("...c,vc->...v", hidden, w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, attn_mask=None):
        """Logits (B, T, V), float32."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids,
                                               attn_mask=attn_mask))
