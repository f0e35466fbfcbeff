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


def _label_logprobs(hidden_nc, head_vc, labels_n):
    """log softmax(hidden @ head.T)[label] for each row, logits in float32."""
    logits = jnp.einsum("nc,vc->nv", hidden_nc, head_vc.astype(hidden_nc.dtype),
                        preferred_element_type=jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels_n[:, None], axis=-1)[:, 0]
    return label_logits - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(hidden_nc, head_vc, labels_n, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """(N,) float32 log-probs of ``labels_n`` under the LM head, in chunks of positions.

    hidden_nc: (N, C) final hidden states (any float dtype); head_vc: (V, C) the head matrix
    (``model.head_weight()``: the embedding when tied, its own matrix when not).
    """
    n = hidden_nc.shape[0]
    if chunk_size <= 0 or chunk_size >= n:
        return _label_logprobs(hidden_nc, head_vc, labels_n)
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    h = jnp.pad(hidden_nc, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, -1)
    y = jnp.pad(labels_n, (0, pad)).reshape(n_chunks, chunk_size)
    # checkpoint: the backward pass recomputes a chunk's logits rather than keeping all of them.
    chunk_fn = jax.checkpoint(lambda hy: _label_logprobs(hy[0], head_vc, hy[1]))
    return jax.lax.map(chunk_fn, (h, y)).reshape(-1)[:n]


def sequence_logprobs_from_hidden(hidden_btc, head_vc, input_ids, loss_mask,
                                  chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The reduction of ``sequence_logprobs`` given the trunk's hidden states (B, T, C)."""
    b, t, c = hidden_btc.shape
    labels = input_ids[:, 1:].reshape(-1)
    lp = token_logprobs(hidden_btc[:, :-1].reshape(-1, c), head_vc, labels, chunk_size)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    lp = lp.reshape(b, t - 1) * mask
    return lp.sum(-1), mask.sum(-1)


def sequence_logprobs_at(hidden_btc, head_vc, pos_rkw, labels_rkw, mask_rkw,
                         chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Summed log-probs of k completions per row, scored only at the given positions.

    pos/labels/mask (R, k, W): completion token w of completion k in row r is ``labels[r, k, w]``,
    scored by the hidden state at ``pos[r, k, w]`` of row r. The LM head runs on these R*k*W
    gathered positions only (prompt positions never touch the vocabulary matmul), and the
    gather stays within each row, so it does not cross devices when rows are split.
    Returns (logps, n_tokens), each (R, k), float32.
    """
    r, k, w = pos_rkw.shape
    h = jnp.take_along_axis(hidden_btc, pos_rkw.reshape(r, k * w)[..., None], axis=1)
    lp = token_logprobs(h.reshape(r * k * w, -1), head_vc, labels_rkw.reshape(-1), chunk_size)
    mask = mask_rkw.astype(jnp.float32)
    return (lp.reshape(r, k, w) * mask).sum(-1), mask.sum(-1)


def model_sequence_logprobs(model, input_ids, attention_mask, loss_mask, *,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, attn_mask=None,
                            position_ids=None):
    """``sequence_logprobs`` without its own ``jax.jit``: for use inside a jitted step."""
    hidden = model.hidden_states(input_ids, attention_mask, position_ids, attn_mask=attn_mask)
    return sequence_logprobs_from_hidden(hidden, model.head_weight(), input_ids, loss_mask,
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
