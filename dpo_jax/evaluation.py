"""Evaluation: the eval metrics over every held-out pair, and pi_ref / pi_theta completions."""

from __future__ import annotations

import dataclasses

import jax

from dpo_jax import data, sampling, sharding
from dpo_jax import keys as K


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """samples (dpo_jax/evaluation.py)"""

    sample_prompts: int = K.key(2, "eval prompts whose pi_ref / pi_theta completions are "
                                "compared at every eval (samples.jsonl, the trackers) and at the "
                                "end; 0 = none", K.integer(0))
    sample_max_new_tokens: int = K.key(32, "tokens per such completion", K.integer(1))
    sample_temperature: float = K.key(0.0, "0 = greedy", K.number(0))
    sample_top_k: int = K.key(0, "0 = off", K.integer(0, "0 = off"))
    sample_top_p: float = K.key(1.0, "1 = off", K.number(0, 1, open_low=True))

    def __post_init__(self):
        K.check_fields(self)


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


def compare_samples(reference, policy, tokenizer, prompts, *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0) -> list:
    """Completions of each prompt by both models (greedy unless ``temperature`` > 0; both
    draw with the same seed): [{prompt, pi_ref, pi_theta}]."""
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p,
                                  eos_id=sampling.stop_ids(reference.config, tokenizer))
    ref, theta = (sampling.complete(m, tokenizer, prompts, cfg, seed=seed)
                  for m in (reference, policy))
    return [{"prompt": p, "pi_ref": r, "pi_theta": t} for p, r, t in zip(prompts, ref, theta)]


def run_samples(run) -> tuple[list | None, str]:
    """(pi_ref and pi_theta on the run's first ``sample_prompts`` eval prompts (train prompts
    without eval data), with its sampling settings, ""), or (None, why) where they cannot be
    drawn here (none asked for, the reference not in memory, or several processes)."""
    config = run.cfg.eval
    if not config.sample_prompts:
        return None, ""
    ref = run.reference_params
    if not ref or run.n_proc > 1:
        why = ("several processes" if ref else "the reference is not in memory (its "
               "log-probs were precomputed, or the loss needs none)")
        return None, (f"samples skipped: {why}; python generate.py --workdir "
                      f"{run.where(run.workdir)} compares pi_ref and pi_theta")
    pairs = run.eval_pairs if run.eval_pairs is not None else run.train_pairs
    prompts = [run.tokenizer.decode(p) for p in pairs.prompt[:config.sample_prompts]]
    return compare_samples(
        run.tuning.reference(run.state["params"], ref),
        run.tuning.model(run.state["params"], ref), run.tokenizer, prompts,
        max_new_tokens=config.sample_max_new_tokens, temperature=config.sample_temperature,
        top_k=config.sample_top_k, top_p=config.sample_top_p, seed=run.cfg.run.seed), ""
