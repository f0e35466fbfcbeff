"""GPT-2 as a Flax NNX module with Hugging Face semantics (HF ``GPT2LMHeadModel``).

Parameter names are GPT-2's own (``wte``, ``wpe``, ``h.attn.c_attn``, ``ln_f``...) and every
parameter is stored in HF's layout (HF's ``Conv1D`` keeps weights (in, out), as ``Linear`` does),
so importing a checkpoint is a table of identical names (``params.py``). Parameters are float32;
``GPT2Config.dtype`` is the compute dtype. Layer norms, attention softmax and logits are computed
in float32 whatever it is.

The module knows nothing about DPO: it supplies its embedding, blocks, final norm and head, and
the trunk every family shares (``models/trunk.py``) runs them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import common
from dpo_jax.models.trunk import CausalLM

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

    @property
    def n_heads(self) -> int:
        return self.n_head

    @property
    def n_kv_heads(self) -> int:
        return self.n_head

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
        self.implementation, self.mesh_axes = cfg.attention, cfg.mesh_axes

    def __call__(self, x_btc, mask_bts, context, per_layer, kv=None, index=None):
        """mask_bts: (B, T, S) True where query t may attend to key s. per_layer: (this layer's
        index,) (traced under the layer scan). With ``kv``, a (k, v) cache of (B, S, H, D)
        arrays, the new keys and values are written at ``index`` and attention runs over the
        whole cache; the updated cache is returned."""
        (layer_idx,) = per_layer
        b, t, c = x_btc.shape
        q, k, v = jnp.split(self.c_attn(x_btc), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.n_head, c // self.n_head) for a in (q, k, v))
        if self.by_layer:  # GPT-2 variant option: scale by 1 / (layer_idx + 1) as well
            q = q / (layer_idx + 1).astype(q.dtype)
        y, kv = common.attention(q, k, v, mask_bts, scale=self.scale,
                                 implementation=self.implementation, kv=kv, index=index,
                                 mesh_axes=self.mesh_axes)
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


class Block(common.PreNormBlock):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.ln_1 = common.LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, cfg.compute_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = common.LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, cfg.compute_dtype)
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_tile, self.mesh_axes = cfg.mlp_tile, cfg.mesh_axes

    def parts(self):
        return self.ln_1, self.attn, self.ln_2, self.mlp


class GPT2(CausalLM):
    """GPT-2 LM (HF ``GPT2LMHeadModel``) with the LM head tied to the token embedding ``wte``.

    The blocks are stacked: ``h`` is one Block whose params carry a leading layer axis
    (``h.attn.c_attn.weight`` is (n_layer, C, 3C); HF's ``h.{i}.attn.c_attn.weight`` is its
    slice i), and the trunk (``trunk.CausalLM``) is a scan over it.
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = common.Embedding(config.vocab_size, config.n_embd, rngs=rngs)
        self.wpe = common.Embedding(config.n_positions, config.n_embd, rngs=rngs)
        self.h = common.stacked(lambda r: Block(config, rngs=r), config.n_layer, rngs)
        self.ln_f = common.LayerNorm(config.n_embd, config.layer_norm_epsilon,
                                     config.compute_dtype)

    @property
    def stack(self):
        return self.h

    def embed(self, input_ids, position_ids):
        return (self.wte(input_ids) + self.wpe(position_ids)).astype(self.config.compute_dtype)

    def layer_inputs(self):
        return (jnp.arange(self.config.n_layer),)  # each block's index (its own scaling option)

    def final_norm(self, x):
        return self.ln_f(x)

    def head_weight(self):
        """The LM head's (V, C) matrix: tied to the token embedding."""
        return self.wte.weight[...]
