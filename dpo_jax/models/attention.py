"""Dot-product attention: who attends to whom (``Mask``), and the kernel that computes it.

A layout describes its attention as a ``Mask``: always the dense (B, T, S) truth, plus, where the
pattern has one, the compact form a fused kernel takes:

- ``lengths`` (B,): causal attention over the first n tokens of each right-padded row (the plain
  pair layout);
- ``segment_ids`` (B, T): causal attention within runs of equal ids (packed pair rows; padding is
  its own segment, whose outputs nobody reads).

Prefix sharing's rule (the rejected tokens see the prompt but not the chosen ones) has neither:
it is dense only, but it lies inside the causal triangle (``causal``), which lets cuDNN skip the
blocks above the diagonal.

Every mask a layout builds also carries its ``Rule``: facts about each position ((B, T) each)
from which the mask between any block of queries and any block of keys is computed on the spot.
Ring attention (``ring``) works from the rule alone, so under context parallelism no device
ever holds its queries' mask against the whole row (the dense form is then never built).

Implementations (config key ``attention``; ``auto`` picks one per platform, see ``resolve``):

- ``xla``: ``jax.nn.dot_product_attention`` on the dense mask; runs everywhere, the reference.
- ``cudnn``: cuDNN's fused flash attention (GPU; bfloat16/float16; head dim a multiple of 8, at
  most 128): lengths become its padding-causal mode; other masks go in as an additive bias with
  the causal flag.
- ``splash``: the Pallas splash-attention kernel (TPU) with a causal mask and segment ids;
  interpreted (slow, exact) off TPU, which is how the tests run it on a CPU. Dense-only masks
  fall back to ``xla``.
- ``tiled``: flash attention's algorithm written in XLA (``ring`` over no context axis):
  queries and keys in tiles, an online softmax, tiles the mask hides skipped, each tile's mask
  from the rule, and a backward pass that recomputes each tile from the saved log-sum-exp. No
  (T x T) logits or mask: memory linear in the row, on any platform, with any mask, window or
  soft-cap. ``auto`` takes it for rows of ``TILED_FROM`` tokens or more where no fused kernel
  applies (cuDNN's heads stop at 128: Gemma 3's are 256).

Decoding with a KV cache always runs ``xla`` (one query at a time: no kernel to gain from).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import mesh as mesh_lib

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "tiled")
CHOICES = ("auto",) + IMPLEMENTATIONS


NO_REACH = np.iinfo(np.int32).min  # ``Rule.reach`` of a query without a window


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rule:
    """Who sees whom as facts about each position of a row, (B, T) each. Query t sees key s
    where all of these hold:

    - ``index[s] <= index[t]``: causal, in the row's own order (kept through a reordering);
    - ``valid[s]``: the key is a real token;
    - ``unit[t] == unit[s]`` (packed rows): within one sequence, or one prefix-sharing triple;
    - not (``branch[t] == 2`` and ``branch[s] == 1``) (prefix sharing: 0 prompt, 1 chosen, 2
      rejected): rejected queries skip the chosen keys;
    - ``positions[s] > reach[t]`` (a sliding window: reach = position - window; ``NO_REACH``
      where the layer has none).

    The same rule describes the queries and the keys (self-attention over the row)."""
    index: jax.Array
    valid: jax.Array
    unit: jax.Array | None = None
    branch: jax.Array | None = None
    positions: jax.Array | None = None
    reach: jax.Array | None = None

    @classmethod
    def of(cls, attention_mask_bt, unit=None, branch=None) -> "Rule":
        b, t = attention_mask_bt.shape
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        as_ids = lambda a: None if a is None else a.astype(jnp.int32)
        return cls(index, attention_mask_bt.astype(bool), as_ids(unit), as_ids(branch))

    def sees(self, keys: "Rule") -> jax.Array:
        """(B, T, S) bool: where these queries see ``keys`` (a rule over other positions)."""
        q = lambda a: a[:, :, None]
        k = lambda a: a[:, None, :]
        out = (k(keys.index) <= q(self.index)) & k(keys.valid)
        if self.unit is not None:
            out = out & (q(self.unit) == k(keys.unit))
        if self.branch is not None:
            out = out & ~((q(self.branch) == 2) & (k(keys.branch) == 1))
        if self.reach is not None:
            out = out & (k(keys.positions) > q(self.reach))
        return out

    def windowed(self, positions_bt, window: int) -> "Rule":
        """This rule within a sliding window of ``window`` positions (a query at position p
        sees keys at positions > p - window)."""
        positions_bt = positions_bt.astype(jnp.int32)
        return dataclasses.replace(self, positions=positions_bt, reach=positions_bt - window)

    def taken(self, order) -> "Rule":
        """The rule of the positions taken in ``order``."""
        return jax.tree.map(lambda a: a[:, order], self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    dense: jax.Array | None               # (B, T, S) bool: True where query t sees key s
    lengths: jax.Array | None = None      # (B,) int32: causal over each row's first n tokens
    segment_ids: jax.Array | None = None  # (B, T) int32: causal within equal ids
    rule: Rule | None = None              # the same mask as facts per position (``Rule``)
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # the order of the positions: 0, as the row has them; n, the zig-zag order over n context
    # devices (``zigzag``), which lets ring attention skip the blocks the causal mask hides
    order: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def causal_padded(cls, attention_mask_bt) -> "Mask":
        """Causal over the real tokens of right- or left-padded rows. Only right padding (every
        real token before every pad, as layouts collate) gives the lengths form; generation's
        left-padded prompts use this with ``lengths`` dropped (see ``dense_only``)."""
        t = attention_mask_bt.shape[1]
        dense = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask_bt.astype(bool)[:, None, :]
        return cls(dense, lengths=attention_mask_bt.astype(jnp.int32).sum(-1),
                   rule=Rule.of(attention_mask_bt), causal=True)

    @classmethod
    def segments(cls, segment_ids_bt, attention_mask_bt) -> "Mask":
        """Causal within segments (-1 marks padding) of packed rows."""
        t = segment_ids_bt.shape[1]
        same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
        dense = jnp.tril(jnp.ones((t, t), bool))[None] & same & \
            attention_mask_bt.astype(bool)[:, None, :]
        return cls(dense, segment_ids=segment_ids_bt.astype(jnp.int32),
                   rule=Rule.of(attention_mask_bt, unit=segment_ids_bt), causal=True)

    def dense_only(self) -> "Mask":
        """Without the kernels' compact forms (lengths, segment ids); the rule stays."""
        return Mask(self.dense, rule=self.rule, causal=self.causal, order=self.order)

    def rule_only(self) -> "Mask":
        """Without the dense form (ring attention's: each block's mask from the rule)."""
        return Mask(None, rule=self.rule, causal=self.causal, order=self.order)

    def reordered(self, order, n: int) -> "Mask":
        """This causal mask over the positions taken in ``order`` (queries and keys alike), the
        zig-zag order over n devices: dense and rule (the kernels' compact forms assume index
        order)."""
        assert self.causal and not self.order, "only a causal mask in index order is reordered"
        return Mask(None if self.dense is None else self.dense[:, order][:, :, order],
                    rule=None if self.rule is None else self.rule.taken(order),
                    causal=True, order=n)

    def sees_itself(self) -> jax.Array:
        """(B, T) bool: the queries that see their own key (the real tokens)."""
        if self.dense is None:  # every rule lets a real token see itself
            return self.rule.valid
        return jnp.diagonal(self.dense, axis1=1, axis2=2)

    @staticmethod
    def per_layer(glob: "Mask", windowed: "Mask", local) -> "Mask":
        """A layer's mask where ``local`` (a traced bool: which layer of a scanned stack) picks
        between a sequence's mask and its sliding-window form (Gemma's local layers)."""
        glob = as_mask(glob)
        dense = (None if windowed.dense is None or glob.dense is None
                 else jnp.where(local, windowed.dense, glob.dense))
        rule = windowed.rule
        if rule is not None:
            rule = dataclasses.replace(rule, reach=jnp.where(local, rule.reach, NO_REACH))
        return dataclasses.replace(windowed, dense=dense, rule=rule)


def zigzag(t: int, n: int) -> np.ndarray | None:
    """The zig-zag order of a row's t positions over n context devices, as in Llama 3's context
    parallelism: the row cut into 2n chunks, device i holding chunks i and 2n-1-i, so under a
    causal mask every device has the same share of the attention work. None where t does not
    cut into 2n equal chunks (then the row keeps its order)."""
    if n < 2 or t % (2 * n):
        return None
    chunks = np.arange(t).reshape(2 * n, t // (2 * n))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]])
                           for i in range(n)])


def as_mask(mask) -> Mask:
    """A ``Mask`` from a Mask or a bare dense (B, T, S) array (causal unknown: ``xla`` only)."""
    return mask if isinstance(mask, Mask) else Mask(mask)


def attend(q, k, v, mask, *, scale: float, implementation: str = "xla",
           softcap: float | None = None, window: int | None = None):
    """Attention of (B, T, H, D) queries over (B, S, K, D) keys and values (K divides H:
    grouped-query attention) under ``mask`` (a ``Mask`` or a dense (B, T, S) array). ``xla``
    computes the logits and softmax in float32 for bfloat16 inputs. ``softcap``: Gemma 2's
    attention-logit soft-capping, cap * tanh(logits / cap) before the mask (XLA and splash).
    ``window``: splash's local window over a compact mask (lengths or segments, where index
    distance is position distance); elsewhere the window is in the dense mask already.
    (``tiled`` is ``ring``'s, which ``common.attention`` calls; here it is ``xla``.)"""
    mask = as_mask(mask)
    if implementation == "splash" and (mask.segment_ids is not None or mask.lengths is not None):
        return _splash(q, k, v, mask, scale, window, softcap)
    if window:
        raise ValueError("attend's window is the splash kernel's (a compact mask); other "
                         "paths take the window in the dense mask")
    if softcap:
        return _softcapped(q, k, v, mask, scale, softcap)
    if implementation == "cudnn" and mask.causal:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn",
                                            **cudnn_arguments(mask))
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense[:, None], scale=scale)


def _softcapped(q, k, v, mask: Mask, scale: float, cap: float):
    """XLA attention with soft-capped logits, as transformers' eager Gemma 2 attention: scaled
    logits in float32, capped, masked, softmax in float32, cast back, then the values."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    logits = cap * jnp.tanh(logits / cap)
    logits = jnp.where(mask.dense[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d).astype(q.dtype)


def cudnn_arguments(mask: Mask) -> dict:
    """How a causal ``Mask`` reaches cuDNN: lengths as its padding-causal mode (no mask tensor),
    anything else as the dense mask (an additive bias) with the causal flag. The same arguments
    with ``implementation="xla"`` are the reference the CPU tests check them against."""
    if mask.lengths is not None:
        return dict(is_causal=True, query_seq_lengths=mask.lengths,
                    key_value_seq_lengths=mask.lengths)
    return dict(mask=mask.dense[:, None], is_causal=True)


# ---------------------------------------------------------------------------- splash (TPU)

def splash_block(t: int) -> int:
    """The block size splash attention tiles a length-t sequence with (0: none fits; the
    kernel's blocks are multiples of 128 lanes, interpreted or not)."""
    for block in (512, 256, 128):
        if t % block == 0:
            return block
    return 0


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, t: int, interpret: bool, window: int | None = None,
                   softcap: float | None = None):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)
    b = splash_block(t)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # causal, or causal within the last `window` positions (a query sees keys > it - window)
    one = (sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0) if window
           else sm.CausalMask((t, t)))
    mask = sm.MultiHeadMask([one for _ in range(heads)])
    # built as concrete arrays even when first asked for inside a trace (a cond's branch): the
    # kernel is cached, and a traced mask array would leak out of that trace
    with jax.ensure_compile_time_eval():
        kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    interpret=interpret, attn_logits_soft_cap=softcap)
    return kernel, sk.SegmentIds


def _splash(q, k, v, mask: Mask, scale: float, window: int | None = None,
            softcap: float | None = None):
    b, t, h, d = q.shape
    if k.shape[2] != h:  # grouped-query: the kernel takes one key head per query head
        k, v = (jnp.repeat(a, h // k.shape[2], axis=2) for a in (k, v))
    kernel, segment_type = _splash_kernel(h, t, jax.default_backend() != "tpu", window,
                                          softcap)
    if mask.segment_ids is not None:
        seg = mask.segment_ids
    else:  # lengths: real tokens are segment 0, padding segment 1
        seg = (jnp.arange(t)[None, :] >= mask.lengths[:, None]).astype(jnp.int32)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q * jnp.asarray(scale, q.dtype), k, v))
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_type(s, s)))(
        q, k, v, seg)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


# ---------------------------------------------------------------------------- choice

def resolve(requested: str, *, platform: str, dtype: str, head_dim: int, mask_forms: set,
            lengths: tuple[int, ...] = (), devices: int = 1,
            model_needs: tuple[str, ...] = ()) -> tuple[str, str]:
    """(implementation, why) for config key ``attention`` on this platform, compute dtype, head
    size, a layout whose masks come in ``mask_forms`` ({"lengths", "segments", "dense"}) and
    rows of ``lengths`` tokens. ``auto`` takes the fused kernel where it applies and says why
    not otherwise; an explicit choice that cannot run raises ``ValueError`` with the reason.
    ``model_needs``: what the model's attention has beyond a causal mask ("a sliding window",
    "soft-capped logits"): splash takes both (a local mask, its logit cap), cuDNN the window (in
    its mask bias) but not the cap."""
    reasons = []
    if requested in ("auto", "cudnn"):
        if "soft-capped logits" in model_needs:
            reasons.append("cudnn does not soft-cap attention logits (the model does)")
        if platform != "gpu":
            reasons.append(f"cudnn needs a GPU (platform {platform})")
        if dtype not in ("bfloat16", "float16"):
            reasons.append(f"cudnn needs bfloat16 or float16 compute (dtype={dtype})")
        if head_dim % 8 or head_dim > 128:
            reasons.append(f"cudnn needs a head size that is a multiple of 8 up to 128 "
                           f"(head size {head_dim})")
        if requested == "cudnn" and reasons:
            raise ValueError("attention='cudnn': " + "; ".join(reasons))
        if platform == "gpu" and not reasons:
            return "cudnn", "cuDNN flash attention" + (
                " (the mask as a bias)" if mask_forms == {"dense"} or model_needs else "")
    if requested in ("auto", "splash"):
        why = []
        if platform != "tpu":
            why.append(f"splash needs a TPU (platform {platform})")
        if "dense" in mask_forms:
            why.append("this layout's mask (prefix sharing: rejected tokens skip the chosen "
                       "ones) has no segment form")
        if any(t % 128 for t in lengths):
            why.append(f"splash needs row lengths that are multiples of 128 ({lengths})")
        if devices > 1:
            why.append(f"splash runs per device and this mesh has {devices} devices "
                       "(its inputs would be gathered)")
        if requested == "splash" and why:
            raise ValueError("attention='splash': " + "; ".join(why))
        if not why:
            return "splash", "Pallas splash attention with segment ids" + (
                f" ({' and '.join(model_needs)} in the kernel)" if model_needs else "") + (
                "" if platform == "tpu" else " (interpreted: exact but slow off a TPU)")
        if platform == "tpu":
            reasons += why
    if requested == "xla":
        return "xla", "XLA attention (config key attention='xla')"
    if requested == "tiled":
        return "tiled", "XLA attention in tiles (config key attention='tiled')"
    if max(lengths, default=0) >= TILED_FROM:
        return "tiled", (f"XLA attention in tiles (rows of {max(lengths)} tokens: no (T x T) "
                         "logits)" + (f"; {'; '.join(reasons)}" if reasons and
                                      platform != "cpu" else ""))
    return "xla", "XLA attention" + (f": {'; '.join(reasons)}" if reasons and
                                     platform != "cpu" else " (the CPU's)")


RING_TILE = 1024  # ring / tiled attention: queries per tile of the (queries x keys) logits
RING_KEY_TILE = 1024  # ring / tiled attention: keys per tile
# auto: rows of this many tokens or more take "tiled" where no fused kernel applies (a CPU
# train step of SmolLM2's width and heads, one device: 1.01x XLA's time at 2048 tokens, 0.84x
# at 4096, 0.50x at 8192; bench/RESULTS.md)
TILED_FROM = 4096


def _tiles(a, axis: int, size: int, fill):
    """``a`` cut along ``axis`` into equal tiles of at most ``size`` (the last padded with
    ``fill``), the tiles on a new leading axis."""
    t = a.shape[axis]
    n = -(-t // size)
    tile = -(-t // n)
    a = jnp.pad(a, [(0, n * tile - t if i == axis else 0) for i in range(a.ndim)],
                constant_values=fill)
    return jnp.moveaxis(a.reshape(a.shape[:axis] + (n, tile) + a.shape[axis + 1:]), axis, 0)


def _untiles(a, axis: int, t: int):
    """The inverse of ``_tiles``: (n, ..., tile, ...) back to (..., t, ...)."""
    a = jnp.moveaxis(a, 0, axis)
    a = a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:])
    return jax.lax.slice_in_dim(a, 0, t, axis=axis)


def ring(q, k, v, mask, *, scale: float, mesh_axes: tuple, softcap: float | None = None):
    """Ring attention over the mesh's ``context`` axis (Liu et al. 2023): each device keeps its
    block of queries and passes its block of keys and values around the ring (``ppermute``),
    folding each arriving block into an online softmax (float32 running max, sum and output),
    so no device ever holds a row's whole keys or its (queries x keys) logits. ``q`` (B, T, H,
    D), ``k`` / ``v`` (B, S, K, D) and ``mask`` (a ``Mask`` or (B, T, S)) as ``attend`` takes
    them, their positions split over ``context`` (rows over the data-parallel axes, heads over
    ``tensor``). Queries that may attend to nothing (padding) give zeros. Without a context
    axis (n = 1: config key ``attention="tiled"``) this is flash attention's tiles on each
    device, no collectives.

    Within a step, queries go in tiles of ``RING_TILE`` and keys in tiles of ``RING_KEY_TILE``:
    the largest logits a device holds are one (query tile x key tile), whatever the row's
    length and the axis size; a tile the mask hides entirely is skipped (``lax.cond``): the
    causal triangle's upper half, other packed units, what a window leaves out. The backward
    pass is flash attention's (a custom VJP): the forward keeps each query's output and
    log-sum-exp, and the backward sends the key blocks around the ring again, their gradients
    travelling with them and arriving home after the last step, each tile's probabilities
    recomputed from the log-sum-exp. Nothing of the forward's tiles is kept, and no step is
    rematerialized.

    A causal mask in zig-zag order (``Mask.order``, see ``zigzag``: device i holds chunks i and
    2n-1-i of the row) skips what the causal mask hides. Of an earlier device's block only the
    first chunk of keys can be seen (by both chunks of queries); of a later one's, both chunks
    of keys, by the second chunk of queries only. So every step folds two (chunk x chunk)
    pieces: the second query chunk against the first key chunk, and one more picked by the
    block's source (no branch: the same work on every device at every step), half a block's
    work; the own block adds the piece of its second chunks. About half the attention of the
    row's own order, balanced over the devices.

    Where the mask has its ``Rule``, each tile's mask is computed from it on the spot (in the
    backward pass too): a device holds the rule of its queries and of the row's keys, (B, T)
    facts, and no dense mask at all. Without one, each device holds its queries' rows of the
    dense (B, T, S) mask."""
    n = mesh_lib.size(mesh_axes, "context")
    P = jax.sharding.PartitionSpec
    heads = P(mesh_lib.ROWS, "context", "tensor", None)
    per_query = heads  # the (B, T, K, G) log-sum-exp, split as the heads are
    mask = as_mask(mask)
    zig = mask.order == n
    # what a device knows of who sees whom: (its queries' side, the keys' side) as
    # (its rule, the row's rule) or (its rows of the dense mask, None)
    if mask.rule is not None:
        sight, sight_specs = (mask.rule, mask.rule), (P(mesh_lib.ROWS, "context"),
                                                      P(mesh_lib.ROWS, None))
    else:
        sight, sight_specs = (mask.dense, None), (P(mesh_lib.ROWS, "context", None), None)

    def seen(sight):
        """(b, t, s) bool of a sight whose queries and keys are cut to one tile's."""
        queries, keys = sight
        return queries if keys is None else queries.sees(keys)

    def cut(sight, qat, kat, c):
        """The sight of queries [qat, qat + c) and keys [kat, kat + c)."""
        queries, keys = sight
        part = lambda a, at, axis: jax.lax.dynamic_slice_in_dim(a, at, c, axis)
        queries = jax.tree.map(lambda a: part(a, qat, 1), queries)
        if keys is None:
            return part(queries, kat, 2), None
        return queries, jax.tree.map(lambda a: part(a, kat, 1), keys)

    def query_tiles(sight):
        return jax.tree.map(lambda a: _tiles(a, 1, RING_TILE, 0), sight[0])

    def key_tiles(sight):
        """(the key tiles of a query tile's sight, scanned over; the tile's sight from one)"""
        queries, keys = sight
        if keys is None:
            return _tiles(queries, 2, RING_KEY_TILE, False), lambda x: (x, None)
        return (jax.tree.map(lambda a: _tiles(a, 1, RING_KEY_TILE, 0), keys),
                lambda x: (queries, x))

    def logits(qg, k):
        """(b, kh, g, t, s) float32 logits, soft-capped, and the tanh the cap applied."""
        z = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
        z = z * jnp.float32(scale)
        if not softcap:
            return z, None
        capped = jnp.tanh(z / softcap)
        return softcap * capped, capped

    def forward_tile(state, qg, k, v, allowed):
        """The online softmax's (max, sum, output) after queries qg (b, t, kh, g, d) meet keys
        and values (b, s, kh, d) where the sight ``allowed`` lets them (``seen``)."""
        allowed = seen(allowed)[:, None, None]

        def fold(state):
            m, l, acc = state
            z = jnp.where(allowed, logits(qg, k)[0], -jnp.inf)
            m_new = jnp.maximum(m, z.max(-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(allowed, jnp.exp(z - safe[..., None]), 0.0)
            fade = jnp.where(jnp.isfinite(m), jnp.exp(m - safe), 0.0)
            l = l * fade + p.sum(-1)
            acc = acc * fade[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p,
                                                     v.astype(jnp.float32))
            return m_new, l, acc

        return jax.lax.cond(allowed.any(), fold, lambda state: state, state)

    def forward_piece(state, qg, k, v, sight):
        """``forward_tile`` over every (query tile x key tile) of queries qg and keys k."""
        t = qg.shape[1]
        kk, vv = (_tiles(a, 1, RING_KEY_TILE, 0) for a in (k, v))

        def per_query_tile(_, x):
            state, qt, sq = x
            ks, tile_sight = key_tiles((sq, sight[1]))
            state, _ = jax.lax.scan(
                lambda state, y: (forward_tile(state, qt, y[0], y[1], tile_sight(y[2])), None),
                state, (kk, vv, ks))
            return None, state

        m, l, acc = state
        _, out = jax.lax.scan(per_query_tile, None, (
            (_tiles(m, 3, RING_TILE, -jnp.inf), _tiles(l, 3, RING_TILE, 0),
             _tiles(acc, 3, RING_TILE, 0)), _tiles(qg, 1, RING_TILE, 0), query_tiles(sight)))
        return tuple(_untiles(a, 3, t) for a in out)

    def backward_tile(dq, qg, k, v, do, lse, delta, allowed):
        """Flash attention's gradients of one (query tile x key tile): dq's new value, and
        this tile's parts of dk and dv. do (b, t, kh, g, d); lse, delta (b, kh, g, t)."""
        allowed = seen(allowed)[:, None, None]

        def grads(dq):
            z, capped = logits(qg, k)
            p = jnp.where(allowed, jnp.exp(z - lse[..., None]), 0.0)
            dv = jnp.einsum("bkgts,btkgd->bskd", p, do)
            dz = p * (jnp.einsum("btkgd,bskd->bkgts", do, v) - delta[..., None])
            if softcap:
                dz = dz * (1 - capped * capped)
            dz = dz * jnp.float32(scale)
            dq = dq + jnp.einsum("bkgts,bskd->btkgd", dz, k)
            dk = jnp.einsum("bkgts,btkgd->bskd", dz, qg)
            return dq, dk, dv

        none = lambda dq: (dq, jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))
        return jax.lax.cond(allowed.any(), grads, none, dq)

    def backward_piece(grads, qg, k, v, do, lse, delta, sight):
        """``backward_tile`` over every (query tile x key tile): (dq, dk, dv) + this piece's."""
        dq, dk, dv = grads
        t, s = qg.shape[1], k.shape[1]
        kk, vv = (_tiles(a, 1, RING_KEY_TILE, 0) for a in (k, v))

        def per_query_tile(dkv, x):
            dq, qt, dot, lset, deltat, sq = x
            ks, tile_sight = key_tiles((sq, sight[1]))

            def per_key_tile(dq, y):
                dq, dk, dv = backward_tile(dq, qt, y[0], y[1], dot, lset, deltat,
                                           tile_sight(y[2]))
                return dq, (dk, dv)

            dq, (dk, dv) = jax.lax.scan(per_key_tile, dq, (kk, vv, ks))
            return (dkv[0] + dk, dkv[1] + dv), dq

        zeros = tuple(jnp.zeros_like(a, jnp.float32) for a in (kk, vv))
        (dk_part, dv_part), dq = jax.lax.scan(per_query_tile, zeros, (
            _tiles(dq, 1, RING_TILE, 0), _tiles(qg, 1, RING_TILE, 0),
            _tiles(do, 1, RING_TILE, 0), _tiles(lse, 3, RING_TILE, jnp.inf),
            _tiles(delta, 3, RING_TILE, 0), query_tiles(sight)))
        return (_untiles(dq, 1, t), dk + _untiles(dk_part, 1, s),
                dv + _untiles(dv_part, 1, s))

    def pieces(me, src, t):
        """The (query offset, key offset, size) pieces a device folds of block ``src``."""
        if not zig:
            return [(0, 0, t)]
        c = t // 2  # zig-zag: a device's two chunks, queries and keys alike
        # the second query chunk sees the first key chunk of every block; the first query
        # chunk sees the first key chunk of its own or an earlier device's block, the second
        # the second key chunk of a later one's
        at = jnp.where(src <= me, 0, c)
        return [(c, 0, c), (at, at, c)]

    def grouped(q, k):
        b, t, h, d = q.shape
        return q.reshape(b, t, k.shape[2], h // k.shape[2], d)

    def around(a):
        if n == 1:
            return a
        return jax.lax.ppermute(a, "context", [(x, (x + 1) % n) for x in range(n)])

    def device():
        return jax.lax.axis_index("context") if n > 1 else 0

    def around_ring(fold, state, blocks, sight):
        """``fold(state, blocks, qat, kat, size, sight) -> (state, blocks)`` over each piece
        (``pieces``) of every key block this device meets, ``blocks`` (the keys and values, and
        what travels with them) passed around the ring after each step: after n steps they are
        home again. ``sight``: this device's (its queries' side, the row's keys' side)."""
        t = blocks[0].shape[1]  # a block's positions: as many as the device's queries
        me = device()
        keys_of = lambda src: cut(sight, 0, src * t, t)  # the sight of block src's keys
        if zig:  # its own block's second chunks, the one pair of chunks the steps leave out
            state, blocks = fold(state, blocks, t // 2, t // 2, t // 2, keys_of(me))

        def step(carry, j):
            state, blocks = carry
            src = (me - j) % n  # the block of keys this device holds at step j
            for qat, kat, size in pieces(me, src, t):
                state, blocks = fold(state, blocks, qat, kat, size, keys_of(src))
            return (state, tuple(map(around, blocks))), None

        (state, blocks), _ = jax.lax.scan(step, (state, blocks), jnp.arange(n))
        return state, blocks

    def local_forward(q, k, v, sight):
        b, t, h, d = q.shape
        qg = grouped(q, k)

        def fold(state, blocks, qat, kat, size, sight):
            k, v = blocks
            part = forward_piece(
                tuple(jax.lax.dynamic_slice_in_dim(a, qat, size, 3) for a in state),
                jax.lax.dynamic_slice_in_dim(qg, qat, size, 1),
                *(jax.lax.dynamic_slice_in_dim(a, kat, size, 1) for a in (k, v)),
                cut(sight, qat, kat, size))
            return tuple(jax.lax.dynamic_update_slice_in_dim(a, p, qat, axis=3)
                         for a, p in zip(state, part)), blocks

        acc0 = jnp.zeros_like(qg, jnp.float32).transpose(0, 2, 3, 1, 4)  # (b, kh, g, t, d),
        # as varying over the mesh as the queries (shard_map's types of the scan's carry)
        state = (acc0[..., 0] - jnp.inf, acc0[..., 0], acc0)
        (m, l, acc), _ = around_ring(fold, state, (k, v), sight)
        out = acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[..., None]  # (b, kh, g, t, d)
        lse = jnp.where(l > 0, m + jnp.log(l), jnp.inf)  # inf: sees nothing, p = 0 below
        return (out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype),
                lse.transpose(0, 3, 1, 2))

    def local_backward(q, k, v, sight, out, lse, dout):
        b, t, h, d = q.shape
        f32 = lambda a: a.astype(jnp.float32)
        qg, do = (f32(grouped(a, k)) for a in (q, dout))
        delta = (do * f32(grouped(out, k))).sum(-1).transpose(0, 2, 3, 1)  # (b, kh, g, t)
        lse = lse.transpose(0, 2, 3, 1)

        def fold(dq, blocks, qat, kat, size, sight):
            k, v, dk, dv = blocks
            qs = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, qat, size, axis)
            ks = lambda a: jax.lax.dynamic_slice_in_dim(a, kat, size, 1)
            part = backward_piece((qs(dq, 1), ks(dk), ks(dv)), qs(qg, 1), ks(k), ks(v),
                                  qs(do, 1), qs(lse, 3), qs(delta, 3),
                                  cut(sight, qat, kat, size))
            return (jax.lax.dynamic_update_slice_in_dim(dq, part[0], qat, 1),
                    (k, v, *(jax.lax.dynamic_update_slice_in_dim(a, p, kat, 1)
                             for a, p in zip((dk, dv), part[1:]))))

        # the keys and values travel in their own dtype, their gradients (home after the last
        # step) beside them in float32
        blocks = (k, v, jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))
        dq, (_, _, dk, dv) = around_ring(fold, jnp.zeros_like(qg), blocks, sight)
        return dq.reshape(b, t, h, d).astype(q.dtype), dk, dv

    # rematerialized although never differentiated: differentiating a scan (the model's
    # layers) hoists what a body computes from its constants alone out of the loop, and would
    # keep every tile's mask (computed from the keys' rule) for all the steps at once
    forward, backward = jax.checkpoint(local_forward), local_backward
    if any(size > 1 for _, size in mesh_axes):  # else one device: no shard_map to run
        forward = jax.shard_map(forward, mesh=mesh_lib.abstract(mesh_axes),
                                in_specs=(heads, heads, heads, sight_specs),
                                out_specs=(heads, per_query))
        backward = jax.shard_map(backward, mesh=mesh_lib.abstract(mesh_axes),
                                 in_specs=(heads, heads, heads, sight_specs, heads, per_query,
                                           heads),
                                 out_specs=(heads, heads, heads))

    @jax.custom_vjp
    def attention(q, k, v, sight):
        return forward(q, k, v, sight)[0]

    def attention_forward(q, k, v, sight):
        out, lse = forward(q, k, v, sight)
        return out, (q, k, v, sight, out, lse)

    def attention_backward(saved, dout):
        q, k, v, sight = saved[:4]
        dq, dk, dv = backward(*saved, dout)
        return (dq, dk.astype(k.dtype), dv.astype(v.dtype),
                jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), sight))

    attention.defvjp(attention_forward, attention_backward)
    return attention(q, k, v, sight)
