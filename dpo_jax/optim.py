"""The optimizer and the batch plan's keys (``OptimConfig``), the optax optimizer they make, and
exact gradient accumulation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dpo_jax import keys as K
from dpo_jax.errors import ConfigError, at_least, choice

OPTIMIZERS = ("adamw", "rmsprop", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """optimization (dpo_jax/optim.py)"""

    optim: str = K.key("adamw", "adamw | rmsprop | adafactor | sgd", K.one_of(*OPTIMIZERS),
                       resume=True)
    learning_rate: float = K.key(1e-6, "peak learning rate", K.number(0, open_low=True),
                                 resume=True)
    lr_scheduler_type: str = K.key("linear", "after warmup: constant | cosine | linear (decay "
                                   "to min)", K.one_of(*SCHEDULES), resume=True)
    warmup_steps: int = K.key(150, "linear warmup from 0, in updates", K.integer(0),
                              resume=True)
    min_lr_ratio: float = K.key(0.0, "decay ends at learning_rate * this", K.number(0, 1),
                                resume=True)
    weight_decay: float = K.key(0.0, "decoupled for adamw/adafactor, L2 for rmsprop; matrices "
                                "only", K.number(0), resume=True)
    decay_biases_and_norms: bool = K.key(False, "True: decay biases and norm scales too",
                                         K.flag, resume=True)
    adam_beta1: float = K.key(0.9, "Adam first-moment decay", K.number(0, 1, open_high=True),
                              resume=True)
    adam_beta2: float = K.key(0.999, "Adam second-moment decay; also rmsprop's decay",
                              K.number(0, 1, open_high=True), resume=True)
    adam_epsilon: float = K.key(1e-8, "Adam / rmsprop epsilon", K.number(0, open_low=True),
                                resume=True)
    max_grad_norm: float = K.key(10.0, "clip the global gradient norm; 0 = off", K.number(0),
                                 resume=True)
    train_batch_size: int = K.key(8, "pairs per micro-batch, global (TRL: per-device x "
                                  "devices)", K.integer(1), resume=True)
    gradient_accumulation_steps: int = K.key(1, "micro-batches per update (exact "
                                             "accumulation)", K.integer(1), resume=True)
    eval_batch_size: int = K.key(8, "pairs per eval batch", K.integer(1))
    num_train_epochs: int = K.key(1, "epochs, when max_steps <= 0", K.integer(0))
    max_steps: int = K.key(-1, "updates to run; <= 0 = num_train_epochs worth", K.integer())

    def __post_init__(self):
        K.check_fields(self)
        if self.max_steps <= 0 and self.num_train_epochs < 1:
            raise ConfigError(f"config keys max_steps={self.max_steps} and num_train_epochs="
                              f"{self.num_train_epochs}: the run would make no update (set "
                              "max_steps > 0 or num_train_epochs >= 1)")
        if (self.max_steps > 0 and self.lr_scheduler_type != "constant"
                and self.warmup_steps > self.max_steps):
            raise ConfigError(f"config key warmup_steps={self.warmup_steps} exceeds max_steps="
                              f"{self.max_steps}")


def validate(config):
    """The optimizer keys, for ``build`` called on its own (a run checks them when its config
    is read: ``dpo_jax.config``)."""
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
