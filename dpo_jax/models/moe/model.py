"""Mixture-of-experts LMs as a Flax NNX module: Qwen3-MoE, Mixtral and OLMoE.

The attention is the Llama family's (``llama.model.Attention``: GQA, RoPE, Qwen3's per-head q/k
norms); OLMoE normalizes the whole q and k projections instead (``qk_norm="full"``). The MLP of
every layer is a sparse mixture of SwiGLU experts:

- the router as each checkpoint defines it: logits = x @ gate (the compute dtype), softmax over
  the experts in float32, the top k, renormalized where ``norm_topk_prob`` (Qwen3-MoE's switch;
  always for Mixtral, whose softmax over the selected logits is the same thing; never for
  OLMoE by default), cast back;
- **dropless** experts: the (token, choice) pairs sorted by expert and run as three grouped
  matmuls (``jax.lax.ragged_dot``) over the experts' stacked weights, each pair scaled by its
  routing weight and added back to its token: no capacity, no token dropped. (On GPU and TPU
  ``ragged_dot`` is a grouped-matmul kernel; JAX lowers it on the CPU as a masked matmul per
  expert, E times the work: fine for tests, not for CPU speed.)
- on a mesh with an ``expert`` axis, each device holds its share of the experts and the tokens
  go to them (``expert_parallel``: ``shard_map``, all-gather and reduce-scatter over the axis).

Qwen3-MoE's dense layers among the sparse ones are a second stack, ``dense_layers`` (a SwiGLU
MLP), run in the checkpoint's order (``MoE.segments``).

Parameters: ``layers.mlp.gate`` (the router, (C, E) as a Linear) and ``layers.mlp.experts.{gate,
up,down}_proj`` (layer, expert, in, out). ``router_logits`` of a batch (for the load-balancing
loss, ``moe.aux_loss``) come from ``MoE.router_logits``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from dpo_jax.errors import choice
from dpo_jax.models import common
from dpo_jax.models import mesh as mesh_lib
from dpo_jax.models.attention import as_mask
from dpo_jax.models.llama.model import Attention, rope, rope_inv_freq
from dpo_jax.models.moe.aux import load_balancing_loss
from dpo_jax.models.trunk import CausalLM


@dataclasses.dataclass(frozen=True)
class MoEConfig(common.HFLayout, common.ComputeOptions):
    """Architecture (the fields of HF's Qwen3MoeConfig / MixtralConfig / OlmoeConfig that change
    the math), then compute options."""

    model_type: str = "qwen3_moe"    # qwen3_moe | mixtral | olmoe
    vocab_size: int = 151936
    hidden_size: int = 2048
    moe_intermediate_size: int = 768  # each expert's SwiGLU width
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    # Qwen3-MoE's dense layers among the sparse ones (its mlp_only_layers, decoder_sparse_step):
    # their HF layer indices, and their SwiGLU width (its intermediate_size)
    dense_layers: tuple = ()
    dense_intermediate_size: int = 0
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    qk_norm: bool | str = False      # True: per head (Qwen3-MoE); "full": whole q / k (OLMoE)
    attention_bias: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None  # Mixtral's: a length limit, as Mistral's
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | tuple = 2
    # compute option: how the experts' grouped matmuls run (KERNELS; ModelConfig's moe_kernel)
    experts_kernel: str = "auto"

    def __post_init__(self):
        self.check_compute()
        choice("experts_kernel", self.experts_kernel, KERNELS)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.rope_type not in ("default", "linear"):
            raise ValueError(f"rope type {self.rope_type!r} is not supported for MoE models "
                             "(default, linear)")
        n = self.num_hidden_layers
        if sorted(set(self.dense_layers)) != list(self.dense_layers) or any(
                not 0 <= i < n for i in self.dense_layers) or len(self.dense_layers) >= n:
            raise ValueError(f"dense layers {list(self.dense_layers)} must be distinct layer "
                             f"indices in [0, {n}), in order, with one sparse layer at least")
        if self.dense_layers and self.dense_intermediate_size <= 0:
            raise ValueError("dense layers need intermediate_size (their SwiGLU width)")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must lie in "
                             f"[1, num_experts={self.num_experts}]")

    def length_limits(self) -> dict[str, int]:
        limits = {"max_position_embeddings": self.max_position_embeddings}
        if self.sliding_window is not None:
            limits["sliding_window"] = self.sliding_window
        return limits

    def expert_parallel_dims(self) -> dict[str, int]:
        """The sizes the expert axis splits (``sharding.check_model_fits``)."""
        return {"num_experts": self.num_experts}

    def tensor_parallel_dims(self) -> dict[str, int]:
        return {"num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "moe_intermediate_size": self.moe_intermediate_size,
                **({"intermediate_size": self.dense_intermediate_size}
                   if self.dense_layers else {}),
                "hidden_size": self.hidden_size}

    def inv_freq(self) -> np.ndarray:
        return rope_inv_freq(self.head_dim, self.rope_type, self.rope_theta, self.rope_factor)


class FullQKNormAttention(Attention):
    """OLMoE's attention: RMSNorm over the whole q and k projections before the heads split."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        super().__init__(dataclasses.replace(cfg, qk_norm=False), rngs=rngs)
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_norm = common.RMSNorm(h * d, cfg.rms_norm_eps, cfg.compute_dtype)
        self.k_norm = common.RMSNorm(k * d, cfg.rms_norm_eps, cfg.compute_dtype)

    def queries_keys(self, x):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x)).reshape(b, t, self.heads, self.head_dim)
        k = self.k_norm(self.k_proj(x)).reshape(b, t, self.kv_heads, self.head_dim)
        return q, k


class Experts(nnx.Module):
    """E SwiGLU experts, their weights stacked: (E, C, F), (E, C, F), (E, F, C)."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        e, c, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nnx.Param(common.normal(rngs, (e, c, f), 0.02))
        self.up_proj = nnx.Param(common.normal(rngs, (e, c, f), 0.02))
        self.down_proj = nnx.Param(common.normal(rngs, (e, f, c), 0.02))
        self.dtype = cfg.compute_dtype

    def weights(self):
        return tuple(p[...].astype(self.dtype)
                     for p in (self.gate_proj, self.up_proj, self.down_proj))


KERNELS = ("auto", "ragged_dot", "scan")  # how the grouped matmuls run (experts_kernel)
TILE = 128  # rows per step of the "scan" kernel


def resolve_kernel(kernel: str) -> str:
    """``auto``: XLA's grouped-matmul kernel (``ragged_dot``) on GPU and TPU; elsewhere JAX
    lowers ragged_dot as a masked matmul per expert, so the tiled ``scan``."""
    if kernel != "auto":
        return kernel
    return "ragged_dot" if jax.default_backend() in ("gpu", "tpu") else "scan"


def swiglu_experts(rows, group_sizes, gate, up, down, kernel: str = "ragged_dot"):
    """Rows sorted by expert, ``group_sizes[e]`` of them for expert e (any rows after the last
    group give zeros), through their experts' SwiGLU, dropless.

    ``ragged_dot``: three grouped matmuls (``jax.lax.ragged_dot``), XLA's grouped-matmul kernel
    on GPU and TPU; on the CPU JAX lowers it as one masked matmul per expert over all the rows
    (E times the work and E copies of the rows). ``scan``: the same sums as a ``lax.scan`` over
    row tiles of one expert each (a tile that crosses a group boundary runs once per group it
    holds, masked): (rows + E x tile) x the expert's work in all, on any backend."""
    if kernel == "ragged_dot":
        g = jax.lax.ragged_dot(rows, gate, group_sizes)
        u = jax.lax.ragged_dot(rows, up, group_sizes)
        return jax.lax.ragged_dot(jax.nn.silu(g) * u, down, group_sizes)
    return _tiled_swiglu(rows, group_sizes, gate, up, down)


def _tiled_swiglu(rows, group_sizes, gate, up, down, tile: int = TILE):
    m, c = rows.shape
    n_groups = gate.shape[0]
    tile = min(tile, m)
    n_tiles = -(-m // tile)
    x = jnp.pad(rows, ((0, n_tiles * tile - m), (0, 0)))
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // tile
    spans = jnp.where(group_sizes > 0, (ends - 1) // tile - first + 1, 0)  # tiles per group
    done = jnp.cumsum(spans)
    # each group boundary inside a tile adds one item: at most n_tiles + n_groups - 1 of them
    item = jnp.arange(n_tiles + n_groups - 1)
    real = item < done[-1]
    group = jnp.minimum(jnp.searchsorted(done, item, side="right"), n_groups - 1)
    at = jnp.where(real, first[group] + item - (done[group] - spans[group]), 0) * tile

    def step(_, it):
        g, at, real = it
        xt = jax.lax.dynamic_slice_in_dim(x, at, tile)
        r = at + jnp.arange(tile)
        mine = real & (r >= starts[g]) & (r < ends[g])
        h = jax.nn.silu(xt @ gate[g]) * (xt @ up[g])
        return None, jnp.where(mine[:, None], h @ down[g], 0)

    # the backward keeps each tile's matmul outputs, not its expert's weight slices (one
    # (C, F) slice per tile would outweigh the rows many times): those are sliced again
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    _, ys = jax.lax.scan(step, None, (group, at, real))  # (items, tile, C)
    rows_of = (at[:, None] + jnp.arange(tile)).reshape(-1)
    return jnp.zeros_like(x).at[rows_of].add(ys.reshape(-1, c).astype(x.dtype))[:m]


def dispatch(x, weights, experts, weight_mats, first: int = 0, kernel: str = "ragged_dot"):
    """Each token's routed experts among [first, first + n) (n = the experts in ``weight_mats``)
    applied to it, scaled by its routing weights and summed: (N, C). The (token, choice) pairs
    are sorted by expert (the others last, outside every group, contributing nothing) and run as
    grouped matmuls. ``x`` (N, C), ``weights`` and ``experts`` (N, k)."""
    n, k = weight_mats[0].shape[0], experts.shape[-1]
    expert = experts.reshape(-1) - first
    mine = (expert >= 0) & (expert < n)
    expert = jnp.where(mine, expert, n)
    order = jnp.argsort(expert, stable=True)         # choices grouped by expert
    token = order // k
    sizes = jnp.bincount(expert, length=n + 1)[:n].astype(jnp.int32)
    y = swiglu_experts(x[token], sizes, *weight_mats, kernel)  # (N k, C), in expert order
    scale = jnp.where(mine, weights.reshape(-1), 0)[order]
    y = jnp.where(mine[order][:, None], y * scale[:, None], 0)
    return jnp.zeros_like(x).at[token].add(y.astype(x.dtype))


def _rows(mesh) -> tuple:
    """The mesh's data-parallel axes, which split a batch's rows."""
    return tuple(a for a in mesh_lib.ROWS if a in mesh.axis_names)


def top_k(x, k: int, mesh_axes=None):
    """``lax.top_k`` over x's last axis; with ``mesh_axes``, of x (..., B, T, E) with its rows
    and positions split over the mesh, run on each device's own (XLA would gather a top-k's
    batch axes onto every device)."""
    if mesh_axes is None:
        return jax.lax.top_k(x, k)
    mesh = mesh_lib.abstract(mesh_axes)
    rows = _rows(mesh)
    spec = P(*(None,) * (x.ndim - 3), rows, mesh_lib.POSITIONS, None)
    return jax.shard_map(lambda a: tuple(jax.lax.top_k(a, k)), mesh=mesh, in_specs=spec,
                         out_specs=(spec, spec))(x)


def expert_parallel(mesh_axes, x, weights, experts, weight_mats, kernel: str = "ragged_dot"):
    """``dispatch`` with the experts split over the mesh's ``expert`` axis (``shard_map``).

    The tokens are split over (data, fsdp, expert) as the batch is (and over context when
    rows' positions are). Each device gathers the tokens of its expert group (all-gather over
    ``expert``), runs the choices routed to its own experts, and the partial sums go back to
    the tokens' devices (reduce-scatter over
    ``expert``; a sum over ``tensor`` where the experts' hidden units are split). The experts'
    matrices arrive split over ``fsdp`` and are gathered per use, as FSDP does. Dropless and
    exact: every choice is run once, on the device that holds its expert. Against an all-to-all
    exchange it sends each token to every device of the group rather than to the ones its k
    experts live on: the same bytes for k >= the expert axis size (Qwen3-MoE's 8 of 128 on 8),
    more for Mixtral's top-2, and no worst-case receive buffer to size."""
    mesh = mesh_lib.abstract(mesh_axes)
    rows = _rows(mesh)
    if x.ndim == 3:  # (B, T, C): rows over the data-parallel axes, positions over context,
        # flattened into tokens on each device
        batch = P(rows, mesh_lib.POSITIONS, None)
    else:  # the tokens (B T, C) of rows split over the data-parallel axes
        batch = P(rows + ((mesh_lib.POSITIONS,) if mesh_lib.POSITIONS in mesh.axis_names
                          else ()), None)
    in_out, out_in = P("expert", "fsdp", "tensor"), P("expert", "tensor", "fsdp")

    def local(x, weights, experts, gate, up, down):
        shape = x.shape
        x, weights, experts = (a.reshape(-1, a.shape[-1]) for a in (x, weights, experts))
        gather = lambda a: jax.lax.all_gather(a, "expert", axis=0, tiled=True)
        gate, up = (jax.lax.all_gather(w, "fsdp", axis=1, tiled=True) for w in (gate, up))
        down = jax.lax.all_gather(down, "fsdp", axis=2, tiled=True)
        first = jax.lax.axis_index("expert") * gate.shape[0]
        y = dispatch(gather(x), gather(weights), gather(experts), (gate, up, down), first,
                     kernel)
        y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, "tensor").reshape(shape)

    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, batch, in_out, in_out, out_in),
                         out_specs=batch)(x, weights, experts, *weight_mats)


class SparseMoE(nnx.Module):
    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.gate = common.Linear(cfg.hidden_size, cfg.num_experts, std=0.02,
                                  dtype=cfg.compute_dtype, rngs=rngs, bias=False)
        self.experts = Experts(cfg, rngs=rngs)
        self.k, self.n_experts = cfg.num_experts_per_tok, cfg.num_experts
        self.norm_topk = cfg.norm_topk_prob
        # flat tokens go through expert_parallel's shard_map with an expert axis; (rows,
        # positions) split over a context axis always do (each device dispatches its own)
        self.mesh_axes = cfg.mesh_axes if cfg.mesh_size("expert") > 1 else None
        self.split_axes = cfg.mesh_axes
        self.kernel = resolve_kernel(cfg.experts_kernel)

    def route(self, x_nc):
        """(router logits (N, E), top-k weights (N, k) in x's dtype, top-k experts (N, k)); or
        of (B, T, C) tokens, each (B, T, ...)."""
        logits = self.gate(x_nc)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, experts = top_k(probs, self.k, self.split_axes if x_nc.ndim == 3 else None)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdims=True)
        return logits, weights.astype(x_nc.dtype), experts

    def __call__(self, x):
        b, t, c = x.shape
        if not common.tokens_flatten():  # positions split over a context axis: rows and
            # positions stay apart (merged they have no sharding), tokens flattened per device
            logits, weights, experts = self.route(x)  # (B, T, E), (B, T, k), (B, T, k)
            self.router_logits = nnx.Intermediate(logits)
            return expert_parallel(self.split_axes, x, weights, experts,
                                   self.experts.weights(), self.kernel)
        xf = x.reshape(b * t, c)
        logits, weights, experts = self.route(xf)
        self.router_logits = nnx.Intermediate(logits)  # for the stack's extras (aux_loss)
        if self.mesh_axes is None:
            out = dispatch(xf, weights, experts, self.experts.weights(), kernel=self.kernel)
        else:
            out = expert_parallel(self.mesh_axes, xf, weights, experts, self.experts.weights(),
                                  self.kernel)
        return out.reshape(b, t, c)


class DecoderLayer(common.PreNormBlock):
    """A sparse layer, or with ``dense`` one of Qwen3-MoE's dense ones (a SwiGLU MLP)."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs, dense: bool = False):
        norm = lambda: common.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
        self.input_layernorm = norm()
        self.self_attn = (FullQKNormAttention(cfg, rngs=rngs) if cfg.qk_norm == "full"
                          else Attention(cfg, rngs=rngs))
        self.post_attention_layernorm = norm()
        self.mlp = (common.GatedMLP(cfg.hidden_size, cfg.dense_intermediate_size,
                                    cfg.compute_dtype, jax.nn.silu, rngs=rngs) if dense
                    else SparseMoE(cfg, rngs=rngs))
        # the dense MLP in tiles; never the experts (their routing keeps the router's logits
        # for the load-balancing loss, and each tile would be dispatched on its own)
        self.mlp_tile, self.mesh_axes = (cfg.mlp_tile if dense else 0), cfg.mesh_axes

    def parts(self):
        return self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp



class MoE(CausalLM):
    """``Qwen3MoeForCausalLM`` / ``MixtralForCausalLM`` / ``OlmoeForCausalLM``."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = common.Embedding(config.vocab_size, config.hidden_size, rngs=rngs)
        n_dense = len(config.dense_layers)
        self.layers = common.stacked(lambda r: DecoderLayer(config, rngs=r),
                                     config.num_hidden_layers - n_dense, rngs)
        if n_dense:  # Qwen3-MoE's dense layers: a stack of their own, run in place (segments)
            self.dense_layers = common.stacked(lambda r: DecoderLayer(config, rngs=r, dense=True),
                                               n_dense, rngs)
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
        return rope(position_ids, c.inv_freq(), c.compute_dtype)

    def final_norm(self, x):
        return self.norm(x)

    def segments(self):
        """Runs of sparse and dense layers in HF order: ((stack, (start, stop)), ...)."""
        dense = set(self.config.dense_layers)
        if not dense:
            return super().segments()
        runs, used = [], {False: 0, True: 0}
        for i in range(self.config.num_hidden_layers):
            kind = i in dense
            if runs and runs[-1][0] == kind:
                runs[-1][2] += 1
            else:
                runs.append([kind, used[kind], 1])
            used[kind] += 1
        return tuple((self.dense_layers if kind else self.layers, (start, start + n))
                     for kind, start, n in runs)

    def layer_extras(self, block):
        """The block's router logits (N, E), taken out of the scan (None: a dense layer)."""
        logits = getattr(block.mlp, "router_logits", None)
        return None if logits is None else logits.get_value()

    def keep_extras(self, extras, mask):
        """(router logits (layers, N, E), the real queries (N,)) of this pass, for aux_loss."""
        real = as_mask(mask).sees_itself()  # (B, T); flat where the logits are (N, E)
        real = real.reshape(-1) if extras is not None and extras.ndim == 3 else real
        passes = self.routing.get_value() if hasattr(self, "routing") else ()
        self.routing = nnx.Intermediate(passes + ((extras, real),))

    def aux_loss(self):
        """The router's load-balancing loss over every pass since this module was built (the
        chosen and rejected rows of a step; padding excluded), as transformers computes it."""
        if not hasattr(self, "routing"):
            return None
        passes = self.routing.get_value()
        logits = jnp.concatenate([p[0] for p in passes], axis=1)
        real = jnp.concatenate([p[1] for p in passes])
        c = self.config
        if logits.ndim == 4:  # (layers, B, T, E): positions split over a context axis
            choose = lambda a, k: top_k(a, k, c.mesh_axes)
            return load_balancing_loss(logits, c.num_experts, c.num_experts_per_tok, real,
                                       choose=choose)
        return load_balancing_loss(logits, c.num_experts, c.num_experts_per_tok, real)

    def head_weight(self):
        if self.config.tie_word_embeddings:
            return self.embed_tokens.weight[...]
        return self.head.weight[...]
