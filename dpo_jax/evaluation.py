"""Evaluation: the eval metrics over every held-out pair, and pi_ref / pi_theta completions."""

from __future__ import annotations

import jax

from dpo_jax import data, sampling, sharding


def evaluate(eval_step, params, frozen, batches: data.PairBatches, mesh) -> dict:
    """Means over every eval pair (batches weighted by their valid pairs)."""
    sums, total = {}, 0.0
    for batch in batches.eval_batches():
        m = jax.device_get(eval_step(params, frozen, sharding.shard_batch(mesh, batch, False)))
        n = float(batch["valid"].sum())  # this process's count: every process has the same
        total += n
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
    return {k: v / total for k, v in sums.items()}


def compare_samples(reference, policy, tokenizer, prompts, *, max_new_tokens: int) -> list:
    """Greedy completions of each prompt by both models: [{prompt, pi_ref, pi_theta}]."""
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id)
    ref, theta = (sampling.complete(m, tokenizer, prompts, cfg) for m in (reference, policy))
    return [{"prompt": p, "pi_ref": r, "pi_theta": t} for p, r, t in zip(prompts, ref, theta)]
