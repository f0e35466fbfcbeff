"""What a run computes on, decided once at setup: the layout of its rows, the attention kernel,
and the batches with the number of updates they make (a packed layout sized for them)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpo_jax import data, layouts, packing, sharding
from dpo_jax.errors import ConfigError
from dpo_jax.models import attention as attention_lib
from dpo_jax.models import common

log = logging.getLogger(__name__)

BALANCE_WINDOW = 64  # packing="balanced" evens the token totals of each 64 shuffled batches


def layout(cfg) -> layouts.Layout:
    """The layout of config keys ``layout`` and ``packing`` (sized later by ``batches``)."""
    return packing.make(cfg.layout.layout, cfg.scoring_window,
                        packed=cfg.layout.packing != "none")


def compute(cfg, model_cfg, layout: layouts.Layout, mesh):
    """``model_cfg`` with the attention kernel of config key ``attention`` (``auto``: the fused
    one where it applies) and the MLP's tiles (config key ``mlp``), each logged once with the
    reason, the mesh it is traced for (a mixture of experts exchanges tokens over its expert
    axis) and its experts' kernel."""
    lengths = sorted({int(b) for b in cfg.data.length_buckets} |
                     {layout.row_length(cfg.data.max_length)})
    try:
        impl, why = attention_lib.resolve(
            cfg.model.attention, platform=jax.default_backend(), dtype=cfg.model.dtype,
            head_dim=model_cfg.head_size, mask_forms={layout.mask_form}, lengths=tuple(lengths),
            devices=mesh.size, model_needs=getattr(model_cfg, "attention_needs", ()))
    except ValueError as e:
        raise ConfigError(f"config key {e}") from None
    log.info("attention: %s", why)
    tile, why = mlp_tile(cfg.model.mlp, max(lengths), hasattr(model_cfg, "experts_kernel"))
    log.info("MLP: %s", why)
    model_cfg = dataclasses.replace(model_cfg, attention=impl, mlp_tile=tile,
                                    mesh_axes=sharding.mesh_axes(mesh))
    return experts_kernel(cfg.model.moe_kernel, model_cfg)


def mlp_tile(key: str, length: int, experts: bool = False) -> tuple[int, str]:
    """(positions per MLP tile, 0 = whole rows; why) for config key ``mlp`` and rows of
    ``length`` tokens: ``auto`` tiles rows of ``attention.TILED_FROM`` tokens or more, as it
    tiles attention there (``common.feed_forward``). ``experts``: the model has sparse layers
    (never tiled)."""
    tile = common.MLP_TILE
    if key == "tiled" or (key == "auto" and length >= attention_lib.TILED_FROM):
        return tile, (f"in tiles of {tile} positions per row (config key mlp={key!r}; rows of "
                      f"{length} tokens" + (": one tile each" if length <= tile else "")
                      + ("; the experts' layers over whole rows)" if experts else ")"))
    return 0, f"whole rows (config key mlp={key!r}; rows of {length} tokens)"


def experts_kernel(key: str, model_cfg):
    """``model_cfg`` with config key ``moe_kernel`` (``models.moe.model.resolve_kernel``), for a
    mixture of experts, logged; the key set for another model is an error."""
    if not hasattr(model_cfg, "experts_kernel"):
        if key != "auto":
            raise ConfigError(f"config key moe_kernel={key}: this model "
                              f"({type(model_cfg).__name__}) has no experts")
        return model_cfg
    from dpo_jax.models.moe.model import resolve_kernel
    log.info("experts: %s grouped matmuls (moe_kernel=%s), dropless", resolve_kernel(key), key)
    return dataclasses.replace(model_cfg, experts_kernel=key)


def agree(*values, op=np.max):
    """The values every process uses: ``op`` over the processes' (one process: as they are)."""
    if jax.process_count() == 1:
        return values
    return tuple(int(v) for v in op(multihost_utils.process_allgather(
        np.asarray(values, np.int64)), axis=0))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's batches and the layouts they are scored in, decided here once: a packed layout
    is sized for the epochs the updates take (the eval batches' for their pass)."""

    train: data.PairBatches
    evals: data.PairBatches | None
    total_steps: int
    layout: layouts.Layout       # the train step's
    eval_layout: layouts.Layout  # the eval step's


def batches(cfg, tokenizer, layout, train_pairs, eval_pairs, mesh) -> Plan:
    """The run's ``Plan``: batches, total updates and the layouts, a packed layout's rows split
    evenly over the devices."""
    d, opt, lay = cfg.data, cfg.optim, cfg.layout
    n_proc = jax.process_count()
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)
    budget = lay.packing == "budget"
    multiple = max(1, sharding.batch_split(mesh) // n_proc)
    kw = dict(max_length=d.max_length, pad_id=pad_id, buckets=d.length_buckets,
              layout=layout, epochs=None, budget=budget,
              length_multiple=sharding.context_multiple(mesh))
    train = data.PairBatches(train_pairs, batch_size=opt.train_batch_size // n_proc,
                             seed=cfg.run.seed, source=d.dataset_name,
                             batch_key="train_batch_size",
                             balance=BALANCE_WINDOW if lay.packing == "balanced" else 0, **kw)
    evals = (data.PairBatches(eval_pairs, batch_size=opt.eval_batch_size // n_proc,
                              shuffle=False, source=d.eval_dataset_name or d.dataset_name,
                              batch_key="eval_batch_size", **kw)
             if eval_pairs else None)
    if budget:  # the rows come first: they decide the batches
        for b in (train, evals) if evals is not None else (train,):
            b.fit_budget(lay.pack_rows, multiple)
    total_steps = _total_steps(cfg, train)
    if lay.packing != "none":
        _fit_packing(cfg, train, evals, total_steps, multiple)
    log.info("train data: %s; padding %.1f%%", data.summary_line(train_pairs.stats),
             100 * train.padding_fraction())
    return Plan(train, evals, total_steps, train.layout,
                evals.layout if evals is not None else train.layout)


def _total_steps(cfg, train) -> int:
    """The run's updates: max_steps, or the epochs' worth (every process the same)."""
    accum = cfg.optim.gradient_accumulation_steps
    micro_per_epoch, = agree(train.steps_per_epoch, op=np.min)
    updates_per_epoch = micro_per_epoch // accum
    if updates_per_epoch == 0:
        raise ConfigError(f"{cfg.data.dataset_name}: {micro_per_epoch} micro-batches of "
                          f"train_batch_size={cfg.optim.train_batch_size} per epoch make no "
                          f"update of gradient_accumulation_steps={accum} (lower one of these "
                          "config keys)")
    return (cfg.optim.max_steps if cfg.optim.max_steps > 0 else
            cfg.optim.num_train_epochs * updates_per_epoch)


def _fit_packing(cfg, train, evals, total_steps: int, multiple: int):
    """Sizes the packed rows for the epochs the run takes (eval batches for their pass)."""
    n_proc, lay, bs = jax.process_count(), cfg.layout, cfg.optim.train_batch_size
    if lay.pack_rows % n_proc:
        raise ConfigError(f"config key pack_rows={lay.pack_rows} does not divide over "
                          f"{n_proc} processes")
    kw = dict(pack_rows=lay.pack_rows // n_proc, multiple=multiple, agree=agree)
    accum = cfg.optim.gradient_accumulation_steps
    train.fit_packing(-(-total_steps * accum // train.steps_per_epoch),
                      ordered=cfg.reference.precompute_ref_log_probs, **kw)
    if evals is not None:
        evals.fit_packing(0, **kw)
    per = (f"as many pairs as fit, at most {2 * bs}; {train.mean_pairs():.1f} on average"
           if lay.packing == "budget" else f"{bs} pairs")
    log.info("packing (%s): %d rows of %d positions per micro-batch of %s (%s)",
             lay.packing, train.layout.rows * n_proc, train.buckets[-1], per,
             train.layout.base.name)
