"""The optax optimizer from the config, and exact gradient accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dpo_jax.errors import ConfigError, at_least, choice

OPTIMIZERS = ("adamw", "rmsprop", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def validate(config):
    """The optimizer keys (dpo_jax.validate checks every key of a run; this is for ``build``
    called on its own)."""
    choice("optim", config.optim, OPTIMIZERS)
    choice("lr_scheduler_type", config.lr_scheduler_type, SCHEDULES)
    if not config.learning_rate > 0:
        raise ConfigError(f"config key learning_rate={config.learning_rate!r}: must be > 0")
    at_least("warmup_steps", config.warmup_steps, 0)
    at_least("gradient_accumulation_steps", config.gradient_accumulation_steps, 1)


def schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then constant / cosine / linear decay to
    ``min_lr_ratio * learning_rate`` at ``total_steps``."""
    validate(config)
    lr, warm = config.learning_rate, config.warmup_steps
    kind = config.lr_scheduler_type
    if kind != "constant" and warm > total_steps:
        raise ConfigError(f"config key warmup_steps={warm} exceeds the run's {total_steps} steps "
                          "(lower it, or use lr_scheduler_type='constant')")
    end = lr * config.min_lr_ratio
    decay_steps = max(total_steps - warm, 1)
    after = {
        "constant": optax.constant_schedule(lr),
        "cosine": optax.cosine_decay_schedule(lr, decay_steps, alpha=config.min_lr_ratio),
        "linear": optax.linear_schedule(lr, end, decay_steps),
    }[kind]
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def build(config, total_steps: int, decay_mask=None
          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule): clip by global norm, then the chosen optimizer.

    decay_mask: a pytree of bools like the params (``models.common.decay_mask``): weight decay
    applies where True. None, or config key decay_biases_and_norms, decays every parameter.
    """
    name = config.optim
    lr = schedule(config, total_steps)
    mask = None if config.decay_biases_and_norms else decay_mask
    opt = {
        "adamw": lambda: optax.adamw(lr, b1=config.adam_beta1, b2=config.adam_beta2,
                                     eps=config.adam_epsilon, weight_decay=config.weight_decay,
                                     mask=mask),
        # rmsprop has no decoupled decay in optax: weight decay is added to the gradient (L2).
        "rmsprop": lambda: optax.chain(optax.add_decayed_weights(config.weight_decay, mask),
                                       optax.rmsprop(lr, decay=config.adam_beta2,
                                                     eps=config.adam_epsilon)),
        "adafactor": lambda: optax.adafactor(lr, weight_decay_rate=config.weight_decay or None,
                                             weight_decay_mask=mask),
        "sgd": lambda: optax.sgd(lr),
    }[name]()
    chain = [opt]
    if config.max_grad_norm and config.max_grad_norm > 0:
        chain.insert(0, optax.clip_by_global_norm(config.max_grad_norm))
    return optax.chain(*chain), lr


def accumulate_gradients(grad_fn, params, micro_batches, weights):
    """Gradient and aux of a whole batch from its micro-batches, exactly.

    grad_fn(params, batch, index) -> ((loss, aux), grads) where loss is a mean over the batch's
    valid pairs and index the micro-batch's (for its randomness); micro_batches is a pytree with
    a leading axis of A micro-batches; weights (A,) are their valid-pair counts. The result is sum_k w_k grad_k / sum_k w_k: the gradient of the mean over
    all pairs, the same update one batch of A x B would give. (Losses that use batch statistics,
    ``aot`` sorting and the token weighting of ``sft`` / ``orpo`` / ``rpo_alpha``, see each
    micro-batch on its own, as accumulation does in TRL.)
    """
    total = jnp.maximum(jnp.sum(weights), 1.0)

    def body(carry, xs):
        batch, w, index = xs
        (loss, aux), grads = grad_fn(params, batch, index)
        scale = w / total
        carry = jax.tree.map(lambda acc, g: acc + scale * g.astype(acc.dtype), carry,
                             (grads, loss, aux))
        return carry, None

    zeros = jax.tree.map(jnp.zeros_like, params)
    first = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda a: a[0], micro_batches),
                                           jnp.int32(0)))
    init = (zeros, jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), first[0][1]))
    index = jnp.arange(weights.shape[0], dtype=jnp.int32)
    (grads, loss, aux), _ = jax.lax.scan(body, init, (micro_batches, weights, index))
    return (loss, aux), grads
