"""Train, eval and reference steps: pure functions of pytrees, jitted, the train state donated.

The parameters come in two parts: ``trainable`` (differentiated, updated by the optimizer, in
the train state) and ``frozen`` (never differentiated, never updated). A *tuning*
(``dpo_jax/tuning/``: full fine-tuning, or LoRA / DoRA with the base as the reference) says how the
policy and the reference are assembled from them.

The gradient is taken with respect to ``trainable`` only (``argnums=0``), so nothing frozen gets
one by construction. Reference log-probs are computed in the step or carried in the batch
(``ref_chosen_logps`` / ``ref_rejected_logps``, precomputed once over the data). The layout
(``layouts.py``) turns a batch into per-pair log-probs; the step never inspects batch keys.

A non-finite loss or gradient norm is recorded in ``state["bad_step"]`` (the first such step; 0 =
none): the loop reads it whenever it fetches metrics and before every save, so it need not wait
for the device at every step and never saves a state past a bad step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dpo_jax.losses import LossConfig, PairLogps, metrics, pair_losses, token_metrics
from dpo_jax.optim import accumulate_gradients


def completion_logps(sums: dict, ld_alpha: float = 1.0):
    """A completion's log-prob for the loss: the sum over its tokens, or with LD-DPO
    (``ld_alpha`` < 1; Liu et al. 2024, arXiv 2409.06411) the tokens past the shorter
    completion's length (its verbose tail) weighted by ld_alpha, as TRL's ``ld_alpha``."""
    if ld_alpha == 1.0:
        return sums["logps"]
    return sums["logps"] - (1.0 - ld_alpha) * sums["tail_logps"]


def make_loss_fn(tuning, layout, loss_cfg: LossConfig, chunk_size: int, pair_blocks: int = 1):
    """loss_fn(trainable, frozen, batch, rng=None) -> (loss, metrics). ``rng``: the key of the
    policy's randomness (LoRA dropout); None for evaluation. The policy's pass also yields the
    per-token statistics of TRL's metrics, WPO's weights and the unlikelihood loss
    (``logprobs.STATS``) where the loss config asks for them (``needs_stats``)."""
    ld = loss_cfg.ld_alpha

    def loss_fn(trainable, frozen, batch, rng=None):
        policy = tuning.model(trainable, frozen, rng)
        c, r = layout.logps(policy, batch, chunk_size=chunk_size, pair_blocks=pair_blocks,
                            stats=loss_cfg.needs_stats)
        pc, pr = completion_logps(c, ld), completion_logps(r, ld)
        if "ref_chosen_logps" in batch:  # precomputed once over the data
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif loss_cfg.needs_reference:  # scored as the policy is (the statistics' pass
            # changes how XLA fuses the log-softmax: scored apart, equal weights gave rewards
            # of +-4e-7 and a step-0 accuracy of 0.25 where TRL logs exactly 0)
            rc, rr = (completion_logps(v, ld) for v in layout.logps(
                tuning.reference(trainable, frozen), batch, chunk_size=chunk_size,
                pair_blocks=pair_blocks, stats=loss_cfg.needs_stats))
        else:
            rc = rr = jnp.zeros_like(pc)
        rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
        valid = batch["valid"].astype(pc.dtype)
        weight = None
        if loss_cfg.use_weighting:  # WPO: exp of each completion's mean aligned log-prob
            weight = jax.lax.stop_gradient(
                jnp.exp(c["wpo"] / jnp.maximum(c["tokens"], 1))
                * jnp.exp(r["wpo"] / jnp.maximum(r["tokens"], 1)))
        plain = (c["logps"], r["logps"]) if ld != 1.0 else (None, None)
        x = PairLogps(pc, pr, rc, rr, c["tokens"], r["tokens"], valid, weight, r.get("unlikely"),
                      *plain)
        losses, chosen_rewards, rejected_rewards = pair_losses(x, loss_cfg)
        m = metrics(x, loss_cfg, losses, chosen_rewards, rejected_rewards)
        if loss_cfg.token_metrics:
            m.update(token_metrics(c, r, valid))
        if loss_cfg.router_aux_loss_coef:  # a mixture of experts' load balance (TRL's name)
            aux = policy.aux_loss()
            m.update(aux_loss=aux, loss=m["loss"] + loss_cfg.router_aux_loss_coef * aux)
        return m["loss"], m

    return loss_fn


def init_state(trainable, optimizer) -> dict:
    return {"params": trainable, "opt_state": optimizer.init(trainable),
            "step": jnp.zeros((), jnp.int32), "bad_step": jnp.zeros((), jnp.int32)}


def make_train_step(tuning, layout, loss_cfg: LossConfig, optimizer, lr_schedule, *,
                    chunk_size: int, pair_blocks: int = 1, in_shardings=None,
                    out_shardings=None, seed: int = 0, sync: tuple[float, int] | None = None):
    """train_step(state, frozen, batch) -> (state, metrics); jitted, state donated.

    state = ``init_state(trainable, optimizer)``. Every batch leaf has a leading axis of
    micro-batches (gradient accumulation, exact: see optim.accumulate_gradients); its length may
    be 1. in/out_shardings, when given, pin the layouts over a mesh (what pjit did). The policy's
    randomness (LoRA dropout) draws from fold_in(seed, step, micro-batch): a resumed run draws
    the same.

    ``sync`` = (alpha, every): TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656). The reference
    is ``state["ref"]`` (``frozen`` is not read) and after every ``every``-th update becomes
    alpha * policy + (1 - alpha) * reference, as TRL's SyncRefModelCallback does: in the
    program, and checkpointed with the state.
    """
    loss_fn = make_loss_fn(tuning, layout, loss_cfg, chunk_size, pair_blocks)
    grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)
    base_key = jax.random.fold_in(jax.random.key(seed), 0x10A)  # apart from data order / init

    def train_step(state, frozen, batch):
        params = state["params"]
        if sync is not None:
            frozen = state["ref"]
        weights = batch["valid"].sum(axis=-1)
        step_key = jax.random.fold_in(base_key, state["step"])
        (_, m), grads = accumulate_gradients(
            lambda p, b, i: grad_fn(p, frozen, b, jax.random.fold_in(step_key, i)), params,
            batch, weights)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        m = dict(m, grad_norm=optax.tree.norm(grads), learning_rate=lr_schedule(state["step"]))
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
               "step": state["step"] + 1, "bad_step": state["bad_step"]}
        if sync is not None:
            alpha, every = sync
            now = new["step"] % every == 0
            new["ref"] = jax.tree.map(
                lambda r, p: jnp.where(now, (alpha * p + (1 - alpha) * r.astype(p.dtype))
                                       .astype(r.dtype), r), state["ref"], new["params"])
        # The first non-finite step is recorded on the device; the loop reads it whenever it
        # fetches metrics, and always before a save. (Selecting the old state here instead
        # would change XLA's fusion of the update, and with it the last bits of every run.)
        ok = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
        new["bad_step"] = jnp.where((state["bad_step"] == 0) & ~ok, state["step"] + 1,
                                    state["bad_step"])
        return new, m

    return jax.jit(train_step, donate_argnums=0, **_shardings(in_shardings, out_shardings))


def make_eval_step(tuning, layout, loss_cfg: LossConfig, *, chunk_size: int,
                   pair_blocks: int = 1, in_shardings=None, out_shardings=None):
    """eval_step(trainable, frozen, batch) -> metrics (means over the batch's valid pairs)."""
    loss_fn = make_loss_fn(tuning, layout, loss_cfg, chunk_size, pair_blocks)
    return jax.jit(lambda trainable, frozen, batch: loss_fn(trainable, frozen, batch)[1],
                   **_shardings(in_shardings, out_shardings))


def make_ref_logps_fn(tuning, layout, *, chunk_size: int, pair_blocks: int = 1,
                      in_shardings=None, out_shardings=None, ld_alpha: float = 1.0,
                      stats: bool = False):
    """ref_fn(trainable, frozen, batch) -> (chosen_logps, rejected_logps): for precomputing
    (``stats``: scored as the policy is, whose pass also computes the statistics)."""
    def ref_fn(trainable, frozen, batch):
        model = tuning.reference(trainable, frozen)
        c, r = layout.logps(model, batch, chunk_size=chunk_size, pair_blocks=pair_blocks,
                            stats=stats)
        return completion_logps(c, ld_alpha), completion_logps(r, ld_alpha)
    return jax.jit(ref_fn, **_shardings(in_shardings, out_shardings))


def _shardings(in_shardings, out_shardings) -> dict:
    kw = {}
    if in_shardings is not None:
        kw["in_shardings"] = in_shardings
    if out_shardings is not None:
        kw["out_shardings"] = out_shardings
    return kw
