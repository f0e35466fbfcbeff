"""Reference log-probs precomputed once over the data (``precompute_ref_log_probs``).

The reference never changes, so its log-probs of every pair can be computed before training
(batched, jitted, sharded like training), cached in the workdir under a fingerprint of the model
and the data, reused by later runs and on resume; the batches then carry them
(``PairBatches.set_reference``, done by the trainer) and the reference's
params are freed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import jax
import numpy as np

from dpo_jax import checkpoint, data, sharding, steps
from dpo_jax import keys as K

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """the reference (dpo_jax/reference.py; TR-DPO in dpo_jax/steps.py)"""

    sync_ref_model: bool = K.key(False, "TR-DPO: mix the reference toward the policy ...",
                                 K.flag, resume=True)
    ref_model_mixup_alpha: float = K.key(0.6, "... ref = alpha * policy + (1 - alpha) * ref ...",
                                         K.number(0, 1, open_low=True), resume=True)
    ref_model_sync_steps: int = K.key(512, "... every this many updates", K.integer(1),
                                      resume=True)
    precompute_ref_log_probs: bool = K.key(False, "score the data with the reference once, "
                                           "before training", K.flag)
    ref_model_name_or_path: str = K.key("", "the reference's own HF folder (full tuning; TRL's "
                                        "ref_model); \"\" = the policy's initial weights",
                                        K.text, resume=True)

    def __post_init__(self):
        K.check_fields(self)


def fingerprint(*parts) -> str:
    """A short hash of settings and token arrays (the cache file's name)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (list, tuple)) and p and isinstance(p[0], np.ndarray):
            for a in p:
                h.update(np.ascontiguousarray(a).tobytes())
                h.update(b"|")
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:20]


def precompute(ref_fn, params, frozen, batches: data.PairBatches, cache: Path, mesh):
    """(chosen, rejected): the reference log-probs of every pair of ``batches``, (N,) each in
    the pairs' order, computed once and cached on disk."""
    if cache.exists():
        z = np.load(cache)
        log.info("reference log-probs read from %s", cache)
        return z["chosen"], z["rejected"]
    pairs = batches.pairs
    chosen = np.zeros(len(pairs), np.float32)
    rejected = np.zeros(len(pairs), np.float32)
    for rows, batch in batches.eval_batches_with_rows():
        c, r = jax.device_get(ref_fn(params, frozen, sharding.shard_batch(mesh, batch, False)))
        c, r = _local_block(c), _local_block(r)
        chosen[rows], rejected[rows] = c[:len(rows)], r[:len(rows)]
    tmp = cache.with_suffix(f".tmp{jax.process_index()}.npz")
    np.savez(tmp, chosen=chosen, rejected=rejected)
    os.replace(tmp, cache)
    log.info("reference log-probs of %d pairs written to %s", len(pairs), cache)
    return chosen, rejected


def _local_block(x):
    """This process's block of a replicated per-pair result (blocks are in process order)."""
    n = len(x) // jax.process_count()
    return x[jax.process_index() * n:(jax.process_index() + 1) * n]


def precompute_for_run(run) -> list[tuple]:
    """[(batches, (chosen, rejected))]: a run's train and eval pairs scored by its reference
    (cached in the workdir, keyed by the model and the tokens), for ``batches.set_reference``."""
    cfg = run.cfg
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    key = fingerprint(checkpoint.model_config_record(run.model_cfg),
                      cfg.model.model_name_or_path, cfg.run.seed, cfg.model.ref_dtype,
                      cfg.model.dtype, cfg.layout.logprob_chunk_size, run.n_proc,
                      run.loss_cfg.ld_alpha, run.loss_cfg.needs_stats)
    out = []
    for pairs, batches in ((run.train_pairs, run.train_batches),
                           (run.eval_pairs, run.eval_batches)):
        if pairs is not None:  # each split scored in its own batches' layout
            ref_fn = steps.make_ref_logps_fn(run.tuning, batches.layout,
                                             out_shardings=replicated,
                                             ld_alpha=run.loss_cfg.ld_alpha,
                                             stats=run.loss_cfg.needs_stats, **run.step_kw())
            fp = fingerprint(key, jax.process_index(), pairs.prompt, pairs.chosen, pairs.rejected)
            out.append((batches, precompute(ref_fn, run.state["params"], run.frozen, batches,
                                            run.workdir / f"ref_logps-{fp}.npz", run.mesh)))
    return out
