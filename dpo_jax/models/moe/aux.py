"""The router's load-balancing loss (Switch Transformer, Fedus et al. 2021, eqs. 4-6), as
transformers' ``load_balancing_loss_func`` computes it for Qwen3-MoE, Mixtral and OLMoE (TRL's
``router_aux_loss_coef`` multiplies it): over the layers and the real tokens together,
E * sum_e (share of top-k choices routed to e) * (mean router probability of e)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balancing_loss(router_logits, num_experts: int, top_k: int, token_mask=None):
    """``router_logits``: (layers, N, E) (or a sequence of (N, E)); ``token_mask``: (N,) 1 for
    real tokens (padding excluded), or None for all. A float32 scalar."""
    logits = jnp.asarray(router_logits, jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)                       # (L, N, E)
    _, chosen = jax.lax.top_k(probs, top_k)                       # (L, N, k)
    mask = (jnp.ones(logits.shape[1], jnp.float32) if token_mask is None
            else jnp.asarray(token_mask, jnp.float32).reshape(-1))
    hits = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32)  # (L, N, k, E)
    tokens_per_expert = (hits * mask[None, :, None, None]).sum((0, 1, 2))
    prob_per_expert = (probs * mask[None, :, None]).sum((0, 1))
    rows = mask.sum() * logits.shape[0]
    return num_experts * jnp.sum((tokens_per_expert / rows) * (prob_per_expert / rows))
