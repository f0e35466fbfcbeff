"""Train, eval and reference steps: pure functions of pytrees, jitted, the train state donated.

The parameters come in two parts: ``trainable`` (differentiated, updated by the optimizer, in
the train state) and ``frozen`` (never differentiated, never updated). A *tuning*
(``dpo_jax/tuning.py``: full fine-tuning, or LoRA with the base as the reference) says how the
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

from dpo_jax.losses import LossConfig, PairLogps, metrics, pair_losses
from dpo_jax.optim import accumulate_gradients
from dpo_jax.tuning import FullTuning  # noqa: F401 (re-exported: steps.FullTuning)


def make_loss_fn(tuning, layout, loss_cfg: LossConfig, chunk_size: int, pair_blocks: int = 1):
    """loss_fn(trainable, frozen, batch, rng=None) -> (loss, metrics). ``rng``: the key of the
    policy's randomness (LoRA dropout); None for evaluation."""

    def logps(model, batch):
        return layout.logps(model, batch, chunk_size=chunk_size, pair_blocks=pair_blocks)

    def loss_fn(trainable, frozen, batch, rng=None):
        pc, pr, nc, nr = logps(tuning.model(trainable, frozen, rng), batch)
        if "ref_chosen_logps" in batch:  # precomputed once over the data
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif loss_cfg.needs_reference:
            rc, rr, _, _ = logps(tuning.reference(trainable, frozen), batch)
        else:
            rc = rr = jnp.zeros_like(pc)
        rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
        valid = batch["valid"].astype(pc.dtype)
        x = PairLogps(pc, pr, rc, rr, nc, nr, valid)
        losses, chosen_rewards, rejected_rewards = pair_losses(x, loss_cfg)
        m = metrics(x, loss_cfg, losses, chosen_rewards, rejected_rewards)
        return m["loss"], m

    return loss_fn


def init_state(trainable, optimizer) -> dict:
    return {"params": trainable, "opt_state": optimizer.init(trainable),
            "step": jnp.zeros((), jnp.int32), "bad_step": jnp.zeros((), jnp.int32)}


def make_train_step(tuning, layout, loss_cfg: LossConfig, optimizer, lr_schedule, *,
                    chunk_size: int, pair_blocks: int = 1, in_shardings=None,
                    out_shardings=None, seed: int = 0):
    """train_step(state, frozen, batch) -> (state, metrics); jitted, state donated.

    state = ``init_state(trainable, optimizer)``. Every batch leaf has a leading axis of
    micro-batches (gradient accumulation, exact: see optim.accumulate_gradients); its length may
    be 1. in/out_shardings, when given, pin the layouts over a mesh (what pjit did). The policy's
    randomness (LoRA dropout) draws from fold_in(seed, step, micro-batch): a resumed run draws
    the same.
    """
    loss_fn = make_loss_fn(tuning, layout, loss_cfg, chunk_size, pair_blocks)
    grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)
    base_key = jax.random.fold_in(jax.random.key(seed), 0x10A)  # apart from data order / init

    def train_step(state, frozen, batch):
        params = state["params"]
        weights = batch["valid"].sum(axis=-1)
        step_key = jax.random.fold_in(base_key, state["step"])
        (_, m), grads = accumulate_gradients(
            lambda p, b, i: grad_fn(p, frozen, b, jax.random.fold_in(step_key, i)), params,
            batch, weights)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        m = dict(m, grad_norm=optax.tree.norm(grads), learning_rate=lr_schedule(state["step"]))
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
               "step": state["step"] + 1, "bad_step": state["bad_step"]}
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
                      in_shardings=None, out_shardings=None):
    """ref_fn(trainable, frozen, batch) -> (chosen_logps, rejected_logps): for precomputing."""
    def ref_fn(trainable, frozen, batch):
        model = tuning.reference(trainable, frozen)
        return layout.logps(model, batch, chunk_size=chunk_size, pair_blocks=pair_blocks)[:2]
    return jax.jit(ref_fn, **_shardings(in_shardings, out_shardings))


def _shardings(in_shardings, out_shardings) -> dict:
    kw = {}
    if in_shardings is not None:
        kw["in_shardings"] = in_shardings
    if out_shardings is not None:
        kw["out_shardings"] = out_shardings
    return kw
