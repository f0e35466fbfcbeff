"""The router's load-balancing loss (Switch Transformer, Fedus et al. 2021, eqs. 4-6), as
transformers' ``load_balancing_loss_func`` computes it for Qwen3-MoE, Mixtral and OLMoE (TRL's
``router_aux_loss_coef`` multiplies it): over the layers and the real tokens together,
E * sum_e (share of top-k choices routed to e) * (mean router probability of e)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balancing_loss(router_logits, num_experts: int, top_k: int, token_mask=None, *,
                        choose=jax.lax.top_k):
    """``router_logits``: (layers, N, E) (or a sequence of (N, E)), or (layers, B, T, E) (the
    tokens as rows and positions, as a context axis splits them); ``token_mask``: (N,) or
    (B, T), 1 for real tokens (padding excluded), or None for all. ``choose``: ``lax.top_k``
    or a form of it that runs per device (``model.top_k``). A float32 scalar."""
    logits = jnp.asarray(router_logits, jnp.float32)
    tokens = logits.shape[1:-1]                                   # (N,) or (B, T)
    probs = jax.nn.softmax(logits, axis=-1)                       # (L, *tokens, E)
    _, chosen = choose(probs, top_k)                              # (L, *tokens, k)
    mask = (jnp.ones(tokens, jnp.float32) if token_mask is None
            else jnp.asarray(token_mask, jnp.float32).reshape(tokens))[None, ..., None]
    hits = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32)  # (L, *tokens, k, E)
    tokens_per_expert = (hits * mask[..., None]).sum(tuple(range(hits.ndim - 1)))
    prob_per_expert = (probs * mask).sum(tuple(range(probs.ndim - 1)))
    rows = mask.sum() * logits.shape[0]
    return num_experts * jnp.sum((tokens_per_expert / rows) * (prob_per_expert / rows))
