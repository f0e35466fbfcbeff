"""What every model family shares: compute options, the layers, the scanned stack, attention.

Parameters are float32 whatever the compute dtype; norms, the attention softmax, logits and
log-softmax run in float32. Every matrix is stored (in, out) so that ``y = x @ W``: GPT-2's
``Conv1D`` checkpoints load as they are, ``nn.Linear``'s (out, in) tensors are transposed by the
family's name table (``params.py``), never in the layers.

Tuning methods (``dpo_jax.tuning``: LoRA, DoRA) wrap the ``Linear`` modules they adapt with
modules of their own that keep the same ``weight`` and ``bias`` (so the same parameter paths);
the layers here know nothing about them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import quant
from dpo_jax.errors import choice
from dpo_jax.models import attention as attention_lib
from dpo_jax.models import mesh as mesh_lib

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a rematerialized block keeps for the backward pass (jax.checkpoint_policies):
REMAT = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # recompute all: least memory
    "dots_saveable": jax.checkpoint_policies.dots_saveable,        # keep matmul outputs
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}
ATTENTION = attention_lib.IMPLEMENTATIONS  # dot-product attention kernels (models/attention.py)
# Fields of a family config that are compute options, not architecture: they are not written to
# config.json and do not fix parameter shapes (a checkpoint restores under any of them).
COMPUTE_FIELDS = ("dtype", "remat", "remat_policy", "attention", "mlp_tile", "mesh_axes",
                  "experts_kernel")  # the last: a mixture of experts' only


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
    """Compute options every family config carries after its architecture fields."""

    dtype: str = "float32"  # compute dtype of matmuls and activations; params stay float32
    remat: bool = False     # recompute each block's activations in the backward pass
    remat_policy: str = "nothing_saveable"  # what a rematerialized block keeps (see REMAT)
    attention: str = "xla"  # attention implementation (see ATTENTION); "xla" runs everywhere
    # the MLP in tiles of this many positions of each row (``feed_forward``); 0 = whole rows
    mlp_tile: int = 0
    # the device mesh the model is traced for, ((axis, size), ...) (``sharding.mesh_axes``; set
    # by the trainer): a layer that runs its own collectives (a mixture of experts' token
    # exchange over the expert axis) reads it; () = no mesh (one device, or GSPMD's choice)
    mesh_axes: tuple = ()

    def check_compute(self):
        choice("dtype", self.dtype, tuple(DTYPES))
        choice("remat_policy", self.remat_policy, tuple(REMAT))
        choice("attention", self.attention, ATTENTION)
        if self.mlp_tile < 0:
            raise ValueError(f"mlp_tile={self.mlp_tile}: must be >= 0 (0 = whole rows)")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def mesh_size(self, axis: str) -> int:
        """The size of a mesh axis the model is traced for (1 without one)."""
        return mesh_lib.size(self.mesh_axes, axis)


ROWS, POSITIONS = mesh_lib.ROWS, mesh_lib.POSITIONS
# attention over a context axis: "ring" (attention.ring: key blocks passed around, an online
# softmax) or "all_gather" (every device gathers the row's keys and values)
CONTEXT_ATTENTION = "ring"
# the order ring attention takes a row's positions in: "zigzag" (balanced, the causally hidden
# half of each block skipped: context_order) or "index" (every block in full)
CONTEXT_ORDER = "zigzag"


def context_order(masks, t: int, mesh_axes):
    """The order a training pass's layers take a row's t positions in over a context axis: the
    zig-zag order (``attention.zigzag``) where ring attention can use it (its masks, a ``Mask``
    or a family's tuple of them, causal and in index order; t cutting into 2n chunks), else
    None (index order)."""
    n = mesh_lib.size(mesh_axes, POSITIONS)
    leaves = masks if isinstance(masks, tuple) else (masks,)
    causal = all(isinstance(m, attention_lib.Mask) and m.causal and not m.order for m in leaves)
    if n < 2 or CONTEXT_ATTENTION != "ring" or CONTEXT_ORDER != "zigzag" or not causal:
        return None
    return attention_lib.zigzag(t, n)


def context_masks(masks, mesh_axes, implementation: str = "xla"):
    """A training pass's masks (a ``Mask`` or a family's tuple of them) as its layers take
    them: under ring attention over a context axis, and with ``tiled`` attention, their rules
    only (``Mask.rule_only``), so the dense (B, T, T) masks are never built and no device
    holds a row's worth of mask."""
    if not tiles(mesh_axes, implementation):
        return masks
    return jax.tree.map(lambda m: m.rule_only() if isinstance(m, attention_lib.Mask) and
                        m.rule is not None else m, masks,
                        is_leaf=lambda m: isinstance(m, attention_lib.Mask))


def tiles(mesh_axes, implementation: str) -> bool:
    """Whether attention runs ``attention.ring`` (in tiles, from the masks' rules): over a
    context axis (unless CONTEXT_ATTENTION gathers the keys), or as ``tiled`` attention."""
    if mesh_lib.size(mesh_axes, POSITIONS) > 1:
        return CONTEXT_ATTENTION == "ring"
    return implementation == "tiled"


def split_positions(x, mesh_axes, *, heads: bool = False, gathered: bool = False):
    """Activations (B, T, ...) pinned to rows over the data-parallel axes and positions over
    the context axis, where the model is traced for a mesh with one (context parallelism: each
    device holds its share of every row's positions); as they are without one. ``heads``: x is
    (B, T, heads, D), its heads over ``tensor``; ``gathered``: every position on every device
    (the keys and values a device's queries attend to)."""
    if mesh_lib.size(mesh_axes, POSITIONS) == 1:
        return x
    rest = ("tensor", None) if heads else (None,) * (x.ndim - 2)
    spec = jax.sharding.PartitionSpec(ROWS, None if gathered else POSITIONS, *rest)
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(mesh_lib.abstract(mesh_axes), spec))


class HFLayout:
    """The model contract's sizes for a config spelled as HF's Llama-style config.json
    (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``max_position_embeddings``): the Llama, Gemma and MoE families' configs."""

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def head_size(self) -> int:
        return self.head_dim

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings


def architecture(cfg) -> dict:
    """The fields of a family config that fix parameter shapes and the math (no compute options)."""
    d = dataclasses.asdict(cfg)
    for name in COMPUTE_FIELDS:
        d.pop(name, None)
    return d


# =========================================================================== layers

def normal(rngs: nnx.Rngs, shape, std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """``y = x @ weight (+ bias)`` with ``weight`` stored (in, out)."""

    def __init__(self, n_in: int, n_out: int, *, std: float, dtype, rngs: nnx.Rngs,
                 bias: bool = True):
        self.weight = nnx.Param(normal(rngs, (n_in, n_out), std))
        self.bias = nnx.Param(jnp.zeros((n_out,), jnp.float32)) if bias else None
        self.dtype = dtype

    def __call__(self, x):
        return apply_2d(lambda x2: project(self, x2), x)


# whether ``apply_2d`` may flatten (rows, positions) into one axis of tokens: not while a trunk
# is traced with its positions split over a context axis (``positions_split``)
_FLATTEN = contextvars.ContextVar("dpo_jax_flatten_tokens", default=True)


def apply_2d(fn, x):
    """``fn`` on x flattened to (tokens, features), the leading axes restored after. The matmul
    and its weight gradient are then plain 2-D GEMMs: XLA runs the weight gradient of a 3-D dot
    noticeably slower on CPU. Not where the positions are split over a context axis: merging
    rows with split positions has no sharding of its own, so XLA would gather the whole row
    onto every device (and compute every token's matmul there)."""
    if not tokens_flatten():
        return fn(x)
    lead = x.shape[:-1]
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


def tokens_flatten() -> bool:
    """Whether the layers being traced may flatten (rows, positions) into tokens (``apply_2d``):
    not with the positions split over a context axis (``positions_split``)."""
    return _FLATTEN.get()


@contextlib.contextmanager
def positions_split(mesh_axes):
    """While a trunk is traced for ``mesh_axes``: with a context axis, ``apply_2d`` keeps the
    (rows, positions) axes as they are."""
    token = _FLATTEN.set(_FLATTEN.get() and mesh_lib.size(mesh_axes, POSITIONS) < 2)
    try:
        yield
    finally:
        _FLATTEN.reset(token)


def project(layer, x2, *, bias: bool = True):
    """``x2 @ layer.weight (+ layer.bias)`` in the layer's compute dtype, for ``x2`` (..., in)
    (2-D where ``apply_2d`` flattens): the matmul of ``Linear`` and of every wrapper a tuning
    method puts around one."""
    y = jnp.dot(x2, layer.weight[...].astype(layer.dtype))
    if bias and layer.bias is not None:
        y = y + layer.bias[...].astype(layer.dtype)
    return y


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with ``jax.nn.silu`` (Llama, a mixture of experts'
    dense layers), GeGLU with tanh-approximate GELU (Gemma)."""

    def __init__(self, width: int, hidden: int, dtype, activation, *, rngs: nnx.Rngs):
        self.gate_proj = Linear(width, hidden, std=0.02, dtype=dtype, rngs=rngs, bias=False)
        self.up_proj = Linear(width, hidden, std=0.02, dtype=dtype, rngs=rngs, bias=False)
        self.down_proj = Linear(hidden, width, std=0.02, dtype=dtype, rngs=rngs, bias=False)
        self.activation = activation

    def __call__(self, x):
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


# config key mlp="tiled" (and auto for rows of attention.TILED_FROM tokens or more): positions
# of each row per MLP tile (on each device, under a context axis)
MLP_TILE = 2048


def feed_forward(fn, x, tile: int, mesh_axes=()):
    """``fn(x)`` for a position-wise ``fn`` (a block's norm and MLP) on x (B, T, C), with
    ``tile`` > 0 computed in tiles of about ``tile`` positions of each row (Snowflake's TiledMLP):
    a ``lax.scan`` over the tiles whose body is rematerialized, so neither pass holds more than a
    tile's (B, tile, hidden) intermediates; the weights' gradients add up over the tiles.

    Each row is cut along its positions (not rows and positions flattened: the rows stay on
    their data-parallel devices); under a context axis each device cuts its own share of the
    positions, so every tile is spread over the axis as the row is. The tiles are made equal
    (the last padded by fewer than the number of tiles); a row of one tile is ``fn(x)`` as it
    is. Inside a tile ``tile_index()`` is the tile's number (LoRA dropout folds it into its
    key, so tiles draw different masks)."""
    b, t, c = x.shape
    p = 1 if tokens_flatten() else mesh_lib.size(mesh_axes, POSITIONS)
    per = t // p  # a context axis divides the rows (layouts pad them to a multiple)
    n = -(-per // tile) if tile else 1
    if n < 2:
        return fn(x)
    size = -(-per // n)
    xs = x.reshape(b, p, per, c)
    if n * size > per:
        xs = jnp.pad(xs, ((0, 0), (0, 0), (0, n * size - per), (0, 0)))
    xs = xs.reshape(b, p, n, size, c).transpose(2, 0, 1, 3, 4)  # (tiles, B, P, size, C)

    @jax.checkpoint
    def one(i, xi):
        token = _TILE.set(i)
        try:
            y = fn(split_positions(xi.reshape(b, p * size, c), mesh_axes if p > 1 else ()))
        finally:
            _TILE.reset(token)
        return y.reshape(b, p, size, y.shape[-1])

    _, ys = jax.lax.scan(lambda carry, a: (carry, one(*a)), None, (jnp.arange(n), xs))
    y = ys.transpose(1, 2, 0, 3, 4).reshape(b, p, n * size, ys.shape[-1])[:, :, :per]
    return split_positions(y.reshape(b, t, -1), mesh_axes if p > 1 else ())


# the number of the MLP tile being traced (``feed_forward``), or None outside one
_TILE = contextvars.ContextVar("dpo_jax_mlp_tile", default=None)


def tile_index():
    """The (traced) number of the ``feed_forward`` tile being traced, or None outside one."""
    return _TILE.get()


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class Head(nnx.Module):
    """An untied LM head: a (V, C) matrix, as HF's ``lm_head.weight`` stores it."""

    def __init__(self, vocab: int, width: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(normal(rngs, (vocab, width), 0.02))


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


class RMSNorm(nnx.Module):
    """RMS norm in float32, as HF's LlamaRMSNorm: normalize in float32, cast to the input dtype,
    then scale (the cast comes before the scale there, so it does here)."""

    def __init__(self, n: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((n,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, n: int, d: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.weight = nnx.Param(normal(rngs, (n, d), std))

    def __call__(self, ids):
        table = self.weight.get_value()
        if quant.is_quantized(table):  # a quantized table: only the rows looked up
            return table.take(ids)
        return jnp.take(table, ids, axis=0)


def positions_from_mask(attention_mask_bt):
    """Position ids that count only real tokens, so left padding does not shift positions.

    Padding positions get 0 (their outputs are never read).
    """
    return jnp.maximum(jnp.cumsum(attention_mask_bt, axis=-1) - 1, 0).astype(jnp.int32)


def causal_padding_mask(attention_mask_bt) -> attention_lib.Mask:
    """Query t may attend to key s <= t that is a real token (left or right padding: dense)."""
    return attention_lib.Mask.causal_padded(attention_mask_bt).dense_only()


def trunk_inputs(input_ids, attention_mask=None, position_ids=None, attn_mask=None):
    """(position_ids, attn_mask) of a family's ``hidden_states``, the defaults filled in: every
    token real, positions counting real tokens only, the causal-and-padding mask."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    if attn_mask is None:
        attn_mask = causal_padding_mask(attention_mask)
    return position_ids, attn_mask


def decode_mask(key_mask_bs, t: int, index):
    """(B, T, S) for T new tokens written at cache positions [index, index + T)."""
    s = key_mask_bs.shape[1]
    causal = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]  # (T, S)
    return causal[None] & key_mask_bs.astype(bool)[:, None, :]


def attention(q, k, v, mask, *, scale: float, implementation: str = "xla", kv=None,
              index=None, softcap: float | None = None, window: int | None = None,
              mesh_axes: tuple = ()):
    """The one place attention runs, for every family and layout (``models/attention.py``):
    ``mask`` is an ``attention.Mask`` or a dense (B, T, S) boolean array. With ``kv``, a (k, v)
    cache of (B, S, K, D) arrays, the new keys and values are written at ``index`` and attention
    runs over the whole cache (with XLA: one query at a time gains nothing from a kernel).
    ``softcap``: soft-capped attention logits (Gemma 2); ``window``: splash's local window.
    ``mesh_axes``: the mesh the model is traced for; with a context axis (each row's positions
    split over it), ring attention (``attention.ring``; CONTEXT_ATTENTION "all_gather": each
    device's queries against the whole row's keys and values, gathered). ``implementation``
    "tiled": ``attention.ring`` over no context axis (the queries' and keys' tiles on each
    device). Returns (output (B, T, H, D), the updated cache or None)."""
    if kv is None and tiles(mesh_axes, implementation):
        return attention_lib.ring(q, k, v, mask, scale=scale, mesh_axes=mesh_axes,
                                  softcap=softcap), None
    if kv is None and mesh_lib.size(mesh_axes, POSITIONS) > 1:
        q = split_positions(q, mesh_axes, heads=True)
        k, v = (split_positions(a, mesh_axes, heads=True, gathered=True) for a in (k, v))
        y = attention_lib.attend(q, k, v, mask, scale=scale, implementation=implementation,
                                 softcap=softcap, window=window)
        return split_positions(y, mesh_axes, heads=True), None
    if kv is not None:
        at = (0, index, 0, 0)
        kv = (jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), at),
              jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), at))
        k, v = kv
        implementation = "xla"
    return attention_lib.attend(q, k, v, mask, scale=scale, implementation=implementation,
                                softcap=softcap, window=window), kv


class PreNormBlock(nnx.Module):
    """x + attention(norm(x)), then + mlp(norm(x)): the block of GPT-2 and of the Llama family.
    A family's block builds its parts in its own parameter names and returns them from
    ``parts()`` as (attention's norm, attention, the MLP's norm, MLP); its attention takes
    ``(x, mask, context, per_layer, kv, index)`` and returns (output, kv)."""

    mlp_tile = 0  # ``feed_forward``'s tile (a family's block sets it from its config)
    mesh_axes = ()

    def parts(self) -> tuple:
        raise NotImplementedError

    def __call__(self, x, mask_bts, context, per_layer, kv=None, index=None):
        attn_norm, attention, mlp_norm, mlp = self.parts()
        a, kv = attention(attn_norm(x), mask_bts, context, per_layer, kv, index)
        x = x + a
        return x + feed_forward(lambda h: mlp(mlp_norm(h)), x, self.mlp_tile, self.mesh_axes), kv


def stacked(make, n: int, rngs: nnx.Rngs):
    """n copies of ``make(rngs)`` as one module whose params carry a leading layer axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs):
        return make(rngs)

    return build(rngs)


def scan_stack(stack, x, layer_fn, xs=(), *, remat: bool = False,
               remat_policy: str = "nothing_saveable", layers: tuple[int, int] | None = None):
    """Runs the stacked layers in order: ``x, y_i = layer_fn(layer_i, x, *xs_i)``; with
    ``layers`` = (start, stop), only those of the stack (``xs`` being theirs).

    A ``lax.scan`` over the leading layer axis of ``stack``'s variables (params and any LoRA
    adapters) and of ``xs``: one layer is compiled instead of n, and rematerialization really
    bounds memory (under a scan the backward pass recomputes one layer at a time whatever the
    backend's scheduler does). Returns (x, stacked ys).
    """
    graphdef, state = nnx.split(stack)
    if layers is not None:
        state = jax.tree.map(lambda a: a[layers[0]:layers[1]], state)

    def body(x, layer):
        variables, *rest = layer
        return layer_fn(nnx.merge(graphdef, variables), x, *rest)

    if remat:
        body = jax.checkpoint(body, policy=REMAT[remat_policy])
    return jax.lax.scan(body, x, (state, *xs))


# =========================================================================== params <-> modules

def abstract(model_cls, cfg):
    """The module with ShapeDtypeStructs for params: its structure, shapes and graphdef, free."""
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))


def params_of(model) -> dict:
    """A module's parameters (``nnx.Param``) as a plain nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def decay_mask(model) -> dict:
    """True for the params weight decay applies to, as ``params_of`` lays them out: every matrix
    (embeddings, projections, LoRA adapters), not biases or the scales of LayerNorm / RMSNorm
    (HF Trainer's rule, so TRL's; nanoGPT's too)."""
    norms = {tuple(path) for path, node in nnx.iter_graph(model)
             if isinstance(node, (LayerNorm, RMSNorm))}

    def walk(tree, path):
        return {k: (walk(v, path + (k,)) if isinstance(v, dict)
                    else not (k == "bias" or path in norms)) for k, v in tree.items()}

    return walk(params_of(model), ())


def build(model_cls, cfg, params: dict):
    """The module with the given params (a nested dict as ``params_of`` returns)."""
    graphdef, state = nnx.split(abstract(model_cls, cfg), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
