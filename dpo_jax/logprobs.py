"""Per-sequence log-probs of completions: the one number DPO is built on.

``sequence_logprobs(model, input_ids, attention_mask, loss_mask)`` returns, per row b,

    logps[b]    = sum_t loss_mask[b, t] * log p(input_ids[b, t] | input_ids[b, :t])
    n_tokens[b] = sum_t loss_mask[b, t]

where token t is scored by the logits at position t - 1 (so ``loss_mask[:, 0]`` is never used).

The LM head and log-softmax run in float32 over chunks of positions: the (B, T, V) logits never
exist at once, and under ``jax.grad`` each chunk's logits are recomputed in the backward pass
instead of stored (``jax.checkpoint``). The label's log-prob is gathered by index, never by a
one-hot over the vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

# Positions per chunk of the LM head. At GPT-2's vocabulary one chunk of float32 logits is
# 1024 * 50257 * 4 bytes = 206 MB. 0 turns chunking off.
DEFAULT_CHUNK_SIZE = 1024
CHUNK_BYTES = 1 << 28  # the automatic chunk's float32 logits stay within 256 MiB


def chunk_positions(key: int, vocab_size: int) -> int:
    """Config key ``logprob_chunk_size``: as set (0: no chunks), or -1, chosen from the vocab:
    the most positions, a power of two in [64, 1024], whose float32 logits fit CHUNK_BYTES
    (1024 at GPT-2's 50k vocab, 512 at Llama 3's 128k, 256 at Qwen3's 152k and Gemma 3's
    262k)."""
    if key >= 0:
        return key
    fit = max(1, CHUNK_BYTES // (4 * vocab_size))
    return int(min(1024, max(64, 1 << (fit.bit_length() - 1))))


# Per-token statistics of the policy computed in the same chunked pass as the log-probs, for
# TRL's metrics and WPO's weights (no gradient flows through these four): the entropy of the
# next-token distribution, WPO's aligned log-prob log p(y) - log sum_v p_v^2, the mean logit over
# the vocabulary, and whether the label is the argmax (ties: the first index, as TRL's kernel);
# and, with its gradient, log(1 - p(y)) for the unlikelihood loss.
STATS = ("entropy", "wpo", "mean_logits", "top1", "unlikely")


def columns(stats: bool) -> tuple[str, ...]:
    """The names of the per-completion sums the reductions below return, in order."""
    return ("logps",) + (STATS if stats else ()) + ("tail_logps", "tokens")


def head_logits(hidden_nc, head):
    """(N, V) float32 logits: ``head`` is a model's output hook (``model.logits_fn()``: the
    family's soft-cap included) or a bare (V, C) head matrix."""
    if callable(head):
        return head(hidden_nc)
    return jnp.einsum("nc,vc->nv", hidden_nc, head.astype(hidden_nc.dtype),
                      preferred_element_type=jnp.float32)


def _label_features(hidden_nc, head_vc, labels_n, stats: bool):
    """(N, 1 + len(STATS) if stats else 1): log softmax(hidden @ head.T)[label] (logits in
    float32), then the statistics."""
    logits = head_logits(hidden_nc, head_vc)
    label_logits = jnp.take_along_axis(logits, labels_n[:, None], axis=-1)[:, 0]
    lse = jax.nn.logsumexp(logits, axis=-1)
    lp = label_logits - lse
    if not stats:
        return lp[:, None]
    z, lz = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(lse)
    entropy = lz - jnp.sum(jnp.exp(z - lz[:, None]) * z, axis=-1)
    wpo = jax.lax.stop_gradient(lp) - (jax.nn.logsumexp(2 * z, axis=-1) - 2 * lz)
    top1 = (jnp.argmax(z, axis=-1) == labels_n).astype(jnp.float32)
    # log(1 - p(label)), with its gradient: the unlikelihood loss's term (Welleck et al. 2019)
    unlikely = jnp.log(-jnp.expm1(jnp.minimum(lp, -1e-6)))
    return jnp.stack([lp, entropy, wpo, jnp.mean(z, axis=-1), top1, unlikely], axis=-1)


def token_features(hidden_nc, head_vc, labels_n, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   stats: bool = False):
    """(N, F) float32 per-token log-probs of ``labels_n`` under the LM head (column 0) and, with
    ``stats``, the STATS columns, in chunks of positions.

    hidden_nc: (N, C) final hidden states (any float dtype); head_vc: the model's output hook
    (``model.logits_fn()``) or a (V, C) head matrix (``head_logits``).
    """
    n = hidden_nc.shape[0]
    if chunk_size <= 0 or chunk_size >= n:
        return _label_features(hidden_nc, head_vc, labels_n, stats)
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    h = jnp.pad(hidden_nc, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, -1)
    y = jnp.pad(labels_n, (0, pad)).reshape(n_chunks, chunk_size)
    # checkpoint: the backward pass recomputes a chunk's logits rather than keeping all of them.
    chunk_fn = jax.checkpoint(lambda hy: _label_features(hy[0], head_vc, hy[1], stats))
    out = jax.lax.map(chunk_fn, (h, y))
    return out.reshape(n_chunks * chunk_size, -1)[:n]


def token_logprobs(hidden_nc, head_vc, labels_n, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """(N,) float32 log-probs of ``labels_n`` under the LM head, in chunks of positions."""
    return token_features(hidden_nc, head_vc, labels_n, chunk_size)[:, 0]


def _sums(feats, mask, tail, axis):
    """Per-completion sums over ``axis`` of masked features, then tail log-probs and tokens."""
    mask = mask.astype(jnp.float32)
    tail = jnp.zeros_like(mask) if tail is None else tail.astype(jnp.float32) * mask
    return jnp.concatenate([(feats * mask[..., None]).sum(axis),
                            (feats[..., 0] * tail).sum(axis)[..., None],
                            mask.sum(axis)[..., None]], axis=-1)


def features_from_hidden(hidden_btc, head_vc, input_ids, loss_mask, tail_mask=None,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, stats: bool = False):
    """(B, F) sums over each row's scored tokens (``columns(stats)``): token t is scored by the
    hidden state at t - 1 where ``loss_mask[:, t]``; ``tail_mask`` (B, T) marks the tokens whose
    log-probs also sum into ``tail_logps`` (LD-DPO's verbose part)."""
    b, t, c = hidden_btc.shape
    labels = input_ids[:, 1:].reshape(-1)
    f = token_features(hidden_btc[:, :-1].reshape(-1, c), head_vc, labels, chunk_size, stats)
    return _sums(f.reshape(b, t - 1, -1), loss_mask[:, 1:],
                 None if tail_mask is None else tail_mask[:, 1:], axis=1)


def sequence_logprobs_from_hidden(hidden_btc, head_vc, input_ids, loss_mask,
                                  chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The reduction of ``sequence_logprobs`` given the trunk's hidden states (B, T, C)."""
    f = features_from_hidden(hidden_btc, head_vc, input_ids, loss_mask, None, chunk_size)
    return f[:, 0], f[:, -1]


def features_at(hidden_btc, head_vc, pos_rkw, labels_rkw, mask_rkw, tail_rkw=None,
                chunk_size: int = DEFAULT_CHUNK_SIZE, stats: bool = False):
    """(R, k, F) sums over k completions per row, scored only at the given positions.

    pos/labels/mask (R, k, W): completion token w of completion k in row r is ``labels[r, k, w]``,
    scored by the hidden state at ``pos[r, k, w]`` of row r. The LM head runs on these R*k*W
    gathered positions only (prompt positions never touch the vocabulary matmul), and the
    gather stays within each row, so it does not cross devices when rows are split.
    """
    r, k, w = pos_rkw.shape
    h = jnp.take_along_axis(hidden_btc, pos_rkw.reshape(r, k * w)[..., None], axis=1)
    f = token_features(h.reshape(r * k * w, -1), head_vc, labels_rkw.reshape(-1), chunk_size,
                       stats)
    return _sums(f.reshape(r, k, w, -1), mask_rkw, tail_rkw, axis=2)


def sequence_logprobs_at(hidden_btc, head_vc, pos_rkw, labels_rkw, mask_rkw,
                         chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Summed log-probs of k completions per row (``features_at``): (logps, n_tokens), each
    (R, k), float32."""
    f = features_at(hidden_btc, head_vc, pos_rkw, labels_rkw, mask_rkw, None, chunk_size)
    return f[..., 0], f[..., -1]


def features_by_slot(hidden_btc, head_vc, pos_rs, labels_rs, slot_rs, k: int, tail_rs=None,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, stats: bool = False):
    """(R, k, F) sums over up to k completions per row from one flat list of S scored
    positions per row (packed rows: the LM head runs on the completion tokens the row really
    holds, not on a window per completion). Scored position s of row r is ``labels[r, s]``
    scored by the hidden state at ``pos[r, s]``, and belongs to completion ``slot[r, s]`` of
    the row (-1: unused)."""
    r, s = pos_rs.shape
    h = jnp.take_along_axis(hidden_btc, pos_rs[..., None], axis=1)
    f = token_features(h.reshape(r * s, -1), head_vc, labels_rs.reshape(-1), chunk_size, stats)
    onehot = (slot_rs[..., None] == jnp.arange(k)).astype(jnp.float32)  # (R, S, k)
    tail = jnp.zeros((r, s), jnp.float32) if tail_rs is None else tail_rs.astype(jnp.float32)
    per_token = jnp.concatenate([f.reshape(r, s, -1), (f[:, 0].reshape(r, s) * tail)[..., None],
                                 jnp.ones((r, s, 1), jnp.float32)], axis=-1)
    return jnp.einsum("rsf,rsk->rkf", per_token, onehot, precision=jax.lax.Precision.HIGHEST)


def model_sequence_logprobs(model, input_ids, attention_mask, loss_mask, *,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, attn_mask=None,
                            position_ids=None):
    """``sequence_logprobs`` without its own ``jax.jit``: for use inside a jitted step."""
    hidden = model.hidden_states(input_ids, attention_mask, position_ids, attn_mask=attn_mask)
    return sequence_logprobs_from_hidden(hidden, model.logits_fn(), input_ids, loss_mask,
                                         chunk_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _sequence_logprobs_jit(graphdef, state, input_ids, attention_mask, loss_mask, chunk_size):
    model = nnx.merge(graphdef, state)
    return model_sequence_logprobs(model, input_ids, attention_mask, loss_mask,
                                   chunk_size=chunk_size)


def sequence_logprobs(model, input_ids, attention_mask, loss_mask, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE):
    """(logps, n_tokens), each (B,) float32: summed log-probs of the tokens where loss_mask is 1.

    Jitted (one compilation per model structure, batch shape and chunk size).
    """
    graphdef, state = nnx.split(model)
    return _sequence_logprobs_jit(graphdef, state, jnp.asarray(input_ids),
                                  jnp.asarray(attention_mask), jnp.asarray(loss_mask),
                                  int(chunk_size))
