"""Train and eval steps: pure functions of pytrees, jitted, the train state donated.

The model enters as a graphdef (static) and a params pytree; ``nnx.merge`` rebuilds it inside the
trace. The reference params are a separate argument that is never differentiated: the gradient is
taken with respect to the policy params only (``argnums=0``), so the reference gets none by
construction. Reference log-probs are either computed in the step from those params or carried in
the batch (``ref_chosen_logps`` / ``ref_rejected_logps``, precomputed once over the data).

Batch layout (``data.PairBatches``): (2B, L) arrays, chosen rows first, one forward for both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dpo_jax.logprobs import model_sequence_logprobs, sequence_logprobs_at
from dpo_jax.losses import LossConfig, PairLogps, metrics, pair_losses
from dpo_jax.optim import accumulate_gradients


def split_pairs(x, pair_blocks: int = 1):
    """(2B,) per-row values -> (chosen (B,), rejected (B,)).

    Rows come in ``pair_blocks`` blocks of [chosen rows; rejected rows]: one block per process,
    whose block is the batch it loaded (``data.PairBatches`` lays out one block).
    """
    x = x.reshape(pair_blocks, 2, -1)
    return x[:, 0].reshape(-1), x[:, 1].reshape(-1)


def prefix_sharing_mask(attention_mask, segment_ids):
    """(B, T, T) attention for rows of prompt (0) + chosen (1) + rejected (2) segments: causal,
    no padding, and rejected queries never see chosen keys (so each completion sees exactly the
    prompt and itself, as in its own sequence)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    keys = attention_mask.astype(bool)[:, None, :]
    crossing = (segment_ids[:, :, None] == 2) & (segment_ids[:, None, :] == 1)
    return causal & keys & ~crossing


def batch_logps(graphdef, params, batch, chunk_size: int, pair_blocks: int = 1):
    """(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens), each (B,), for either
    batch layout (data.PairBatches), with or without completion-only scoring."""
    model = nnx.merge(graphdef, params)
    if "score_pos" not in batch:  # the plain layout: LM head over every position, masked
        logps, n = model_sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                           batch["loss_mask"], chunk_size=chunk_size)
        return (*split_pairs(logps, pair_blocks), *split_pairs(n, pair_blocks))
    attn_mask = None
    if "segment_ids" in batch:
        attn_mask = prefix_sharing_mask(batch["attention_mask"], batch["segment_ids"])
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                 batch.get("position_ids"), attn_mask=attn_mask)
    logps, n = sequence_logprobs_at(hidden, model.wte.weight[...], batch["score_pos"],
                                    batch["score_label"], batch["score_mask"], chunk_size)
    if logps.shape[1] == 2:  # prefix sharing: each row holds its pair
        return logps[:, 0], logps[:, 1], n[:, 0], n[:, 1]
    return (*split_pairs(logps[:, 0], pair_blocks), *split_pairs(n[:, 0], pair_blocks))


def make_loss_fn(graphdef, ref_graphdef, loss_cfg: LossConfig, chunk_size: int,
                 pair_blocks: int = 1):
    """loss_fn(params, ref_params, batch) -> (loss, metrics)."""

    def loss_fn(params, ref_params, batch):
        pc, pr, nc, nr = batch_logps(graphdef, params, batch, chunk_size, pair_blocks)
        if "ref_chosen_logps" in batch:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif loss_cfg.needs_reference:
            rc, rr, _, _ = batch_logps(ref_graphdef, ref_params, batch, chunk_size, pair_blocks)
        else:
            rc = rr = jnp.zeros_like(pc)
        rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
        valid = batch["valid"].astype(pc.dtype)
        x = PairLogps(pc, pr, rc, rr, nc, nr, valid)
        losses, chosen_rewards, rejected_rewards = pair_losses(x, loss_cfg)
        m = metrics(losses, chosen_rewards, rejected_rewards, pc, pr, valid)
        return m["loss"], m

    return loss_fn


def make_train_step(graphdef, ref_graphdef, loss_cfg: LossConfig, optimizer, lr_schedule, *,
                    chunk_size: int, pair_blocks: int = 1, in_shardings=None,
                    out_shardings=None):
    """train_step(state, ref_params, batch) -> (state, metrics); jitted, state donated.

    state = {"params", "opt_state", "step"}. Every batch leaf has a leading axis of micro-batches
    (gradient accumulation, exact: see optim.accumulate_gradients); its length may be 1.
    in/out_shardings, when given, pin the layouts over a mesh (what pjit did).
    """
    loss_fn = make_loss_fn(graphdef, ref_graphdef, loss_cfg, chunk_size, pair_blocks)
    grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)

    def train_step(state, ref_params, batch):
        params = state["params"]
        weights = batch["valid"].sum(axis=-1)
        (_, m), grads = accumulate_gradients(lambda p, b: grad_fn(p, ref_params, b), params,
                                             batch, weights)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        m = dict(m, grad_norm=optax.tree.norm(grads), learning_rate=lr_schedule(state["step"]))
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        return new_state, m

    return jax.jit(train_step, donate_argnums=0, **_shardings(in_shardings, out_shardings))


def make_eval_step(graphdef, ref_graphdef, loss_cfg: LossConfig, *, chunk_size: int,
                   pair_blocks: int = 1, in_shardings=None, out_shardings=None):
    """eval_step(params, ref_params, batch) -> metrics (means over the batch's valid pairs)."""
    loss_fn = make_loss_fn(graphdef, ref_graphdef, loss_cfg, chunk_size, pair_blocks)
    return jax.jit(lambda params, ref_params, batch: loss_fn(params, ref_params, batch)[1],
                   **_shardings(in_shardings, out_shardings))


def make_ref_logps_fn(ref_graphdef, *, chunk_size: int, pair_blocks: int = 1,
                      in_shardings=None, out_shardings=None):
    """ref_fn(ref_params, batch) -> (chosen_logps, rejected_logps): for precomputing."""
    return jax.jit(lambda p, batch: batch_logps(ref_graphdef, p, batch, chunk_size,
                                                pair_blocks)[:2],
                   **_shardings(in_shardings, out_shardings))


def _shardings(in_shardings, out_shardings) -> dict:
    kw = {}
    if in_shardings is not None:
        kw["in_shardings"] = in_shardings
    if out_shardings is not None:
        kw["out_shardings"] = out_shardings
    return kw
