"""What a run computes on, decided once at setup: the layout of its rows, the attention kernel,
and the batches with the number of updates they make (a packed layout sized for them)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from dpo_jax import data, layouts
from dpo_jax.errors import ConfigError
from dpo_jax.models import attention as attention_lib

log = logging.getLogger(__name__)

BALANCE_WINDOW = 64  # packing="balanced" evens the token totals of each 64 shuffled batches


def scoring_window(config) -> int:
    """The static completion window of the completion-only head (0 = head on every position)."""
    if (config.layout == "prefix_sharing" or config.completion_only_head
            or config.packing != "none"):
        return config.max_completion_length
    return 0


def layout(config) -> layouts.Layout:
    """The layout of config keys ``layout`` and ``packing`` (sized later by ``batches``)."""
    return layouts.make(config.layout, scoring_window(config), packed=config.packing != "none")


def attention(config, model_cfg, layout: layouts.Layout, mesh):
    """``model_cfg`` with the attention kernel of config key ``attention`` (``auto``: the fused
    one where it applies), logged once with the reason."""
    lengths = sorted({int(b) for b in config.length_buckets} |
                     {layout.row_length(config.max_length)})
    try:
        impl, why = attention_lib.resolve(
            config.attention, platform=jax.default_backend(), dtype=config.dtype,
            head_dim=model_cfg.head_size, mask_forms={layout.mask_form}, lengths=tuple(lengths),
            devices=mesh.size)
    except ValueError as e:
        raise ConfigError(f"config key {e}") from None
    log.info("attention: %s", why)
    return dataclasses.replace(model_cfg, attention=impl)


def agree(*values, op=np.max):
    """The values every process uses: ``op`` over the processes' (one process: as they are)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    return tuple(int(v) for v in op(multihost_utils.process_allgather(
        np.asarray(values, np.int64)), axis=0))


def batches(config, tokenizer, layout, train_pairs, eval_pairs, mesh):
    """(train batches, eval batches or None, total updates); a packed layout sized for the
    epochs those updates take, its rows split evenly over the devices."""
    n_proc = jax.process_count()
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)
    budget = config.packing == "budget"
    multiple = max(1, mesh.shape["data"] * mesh.shape["fsdp"] // n_proc)
    kw = dict(max_length=config.max_length, pad_id=pad_id, buckets=config.length_buckets,
              layout=layout, epochs=None, budget=budget)
    train = data.PairBatches(train_pairs, batch_size=config.train_batch_size // n_proc,
                             seed=config.seed, source=config.dataset_name,
                             batch_key="train_batch_size",
                             balance=BALANCE_WINDOW if config.packing == "balanced" else 0, **kw)
    evals = (data.PairBatches(eval_pairs, batch_size=config.eval_batch_size // n_proc,
                              shuffle=False, source=config.eval_dataset_name or
                              config.dataset_name, batch_key="eval_batch_size", **kw)
             if eval_pairs else None)
    if budget:  # the rows come first: they decide the batches
        for b in (train, evals) if evals is not None else (train,):
            b.fit_budget(config.pack_rows, multiple)
    accum = config.gradient_accumulation_steps
    micro_per_epoch, = agree(train.steps_per_epoch, op=np.min)  # the same steps everywhere
    updates_per_epoch = micro_per_epoch // accum
    if updates_per_epoch == 0:
        raise ConfigError(f"{config.dataset_name}: {micro_per_epoch} micro-batches of "
                          f"train_batch_size={config.train_batch_size} per epoch make no update of "
                          f"gradient_accumulation_steps={accum} (lower one of these config keys)")
    total_steps = config.max_steps if config.max_steps > 0 else \
        config.num_train_epochs * updates_per_epoch
    if config.packing != "none":
        if config.pack_rows % n_proc:
            raise ConfigError(f"config key pack_rows={config.pack_rows} does not divide over "
                              f"{n_proc} processes")
        kw = dict(pack_rows=config.pack_rows // n_proc, multiple=multiple, agree=agree)
        train.fit_packing(-(-total_steps * accum // train.steps_per_epoch),
                          ordered=config.precompute_ref_log_probs, **kw)
        if evals is not None:
            evals.fit_packing(0, **kw)
        per = (f"as many pairs as fit, at most {2 * config.train_batch_size}; "
               f"{train.mean_pairs():.1f} on average" if budget else
               f"{config.train_batch_size} pairs")
        log.info("packing (%s): %d rows of %d positions per micro-batch of %s (%s)",
                 config.packing, train.layout.rows * n_proc, train.buckets[-1], per,
                 train.layout.base.name)
    log.info("train data: %s; padding %.1f%%", data.summary_line(train_pairs.stats),
             100 * train.padding_fraction())
    return train, evals, total_steps
