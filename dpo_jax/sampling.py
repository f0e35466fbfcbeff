"""Jitted autoregressive generation with a KV cache: greedy, temperature, top-k, top-p.

Prompts come left-padded (B, P) with their attention mask; position ids count real tokens only, so
a padded prompt continues exactly as the unpadded one would. Generation stops per row at EOS (the
row then emits EOS as padding) and for the batch when every row has stopped.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.errors import ConfigError
from dpo_jax.models.common import positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    eos_id: int | tuple[int, ...] | None = None  # stop a row at (any of) these; None = never

    @property
    def stops(self) -> tuple[int, ...]:
        """The ids that end a row (the first also pads a finished row)."""
        if self.eos_id is None:
            return ()
        return tuple(self.eos_id) if isinstance(self.eos_id, (tuple, list)) else (self.eos_id,)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                              f"temperature={self.temperature}, top_k={self.top_k}, "
                              f"top_p={self.top_p}")


def sample_token(logits, rng, cfg: SamplingConfig):
    """One token per row from float32 logits (B, V)."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    neg = jnp.finfo(logits.dtype).min
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < cfg.top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _stopped(tok, cfg: SamplingConfig):
    if not cfg.stops:
        return jnp.zeros(tok.shape, bool)
    return jnp.isin(tok, jnp.asarray(cfg.stops, jnp.int32))


def stop_ids(model_config, tokenizer) -> tuple[int, ...]:
    """What ends a completion: the tokenizer's EOS and the model config's ``eos_token_id``(s)
    (an instruct model lists its end-of-turn token there: Gemma's <end_of_turn>)."""
    ids = [tokenizer.eos_token_id]
    eos = getattr(model_config, "eos_token_id", None)
    ids += list(eos) if isinstance(eos, (tuple, list)) else [eos]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _generate_cached(model, prompt_ids, prompt_mask, rng, cfg: SamplingConfig):
    b, p = prompt_ids.shape
    n = cfg.max_new_tokens
    key_mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((b, n), bool)], axis=1)
    cache = model.init_cache(b, p + n)
    h, cache = model.decode(prompt_ids, positions_from_mask(prompt_mask), key_mask, cache, 0)
    logits = model.lm_head(h[:, -1])
    n_real = prompt_mask.sum(-1).astype(jnp.int32)
    fill = cfg.stops[0] if cfg.stops else 0
    out = jnp.full((b, n), fill, jnp.int32)

    def cond(c):
        i, _, _, _, done, _ = c
        return (i < n) & ~jnp.all(done)

    def body(c):
        i, cache, logits, out, done, rng = c
        rng, sub = jax.random.split(rng)
        tok = jnp.where(done, fill, sample_token(logits, sub, cfg))
        out = out.at[:, i].set(tok)
        done = done | _stopped(tok, cfg)
        h, cache = model.decode(tok[:, None], (n_real + i)[:, None], key_mask, cache, p + i)
        return i + 1, cache, model.lm_head(h[:, -1]), out, done, rng

    init = (jnp.int32(0), cache, logits, out, jnp.zeros((b,), bool), rng)
    return jax.lax.while_loop(cond, body, init)[3]


def _generate_uncached(model, prompt_ids, prompt_mask, rng, cfg: SamplingConfig):
    """The reference: a full forward over the whole buffer for every new token."""
    b, p = prompt_ids.shape
    n = cfg.max_new_tokens
    fill = cfg.stops[0] if cfg.stops else 0
    ids = jnp.concatenate([prompt_ids, jnp.zeros((b, n), prompt_ids.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n), prompt_mask.dtype)], axis=1)
    done = jnp.zeros((b,), bool)
    for i in range(n):
        rng, sub = jax.random.split(rng)
        logits = model(ids, mask)[:, p + i - 1]
        tok = jnp.where(done, fill, sample_token(logits, sub, cfg))
        ids = ids.at[:, p + i].set(tok)
        mask = mask.at[:, p + i].set(1)
        done = done | _stopped(tok, cfg)
    return ids[:, p:]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "use_cache"))
def _generate_jit(graphdef, state, prompt_ids, prompt_mask, rng, cfg, use_cache):
    model = nnx.merge(graphdef, state)
    fn = _generate_cached if use_cache else _generate_uncached
    return fn(model, prompt_ids, prompt_mask, rng, cfg)


def generate(model, prompt_ids, prompt_mask, cfg: SamplingConfig, *, seed: int = 0,
             use_cache: bool = True, devices=None) -> np.ndarray:
    """New tokens (B, max_new_tokens), int32; rows that stopped are EOS-padded after their EOS.
    ``devices``: split the rows over these devices (the params replicated on each; B a
    multiple of their count), the same tokens as on one."""
    for field, room in model.config.length_limits().items():
        if prompt_ids.shape[1] + cfg.max_new_tokens > room:
            raise ConfigError(f"a prompt of {prompt_ids.shape[1]} tokens + max_new_tokens "
                              f"{cfg.max_new_tokens} exceeds the model's {field}={room}")
    graphdef, state = nnx.split(model)
    ids, mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    if devices is not None and len(devices) > 1:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("rows",))
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
        ids, mask = jax.device_put(ids, rows), jax.device_put(mask, rows)
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh,
                                                                 jax.sharding.PartitionSpec()))
    return np.asarray(_generate_jit(graphdef, state, ids, mask, jax.random.key(seed), cfg,
                                    use_cache))


def left_pad(token_lists, pad_id: int, length: int | None = None):
    """(ids, mask) numpy arrays of left-padded prompts."""
    length = length or max(len(t) for t in token_lists)
    ids = np.full((len(token_lists), length), pad_id, np.int32)
    mask = np.zeros((len(token_lists), length), np.int32)
    for i, t in enumerate(token_lists):
        t = list(t)[-length:]
        if t:
            ids[i, -len(t):] = t
            mask[i, -len(t):] = 1
    return ids, mask


def complete(model, tokenizer, prompts, cfg: SamplingConfig, *, seed: int = 0) -> list[str]:
    """Text completions of text prompts (tokenized without special tokens, as in training). An
    empty prompt starts from the tokenizer's BOS (else EOS) token: an unconditional sample."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
        tokenizer.eos_token_id
    toks = [tokenizer(p, add_special_tokens=False)["input_ids"] or [start] for p in prompts]
    ids, mask = left_pad(toks, tokenizer.eos_token_id or 0)
    out = generate(model, ids, mask, cfg, seed=seed)
    texts = []
    for row in out:
        row = list(row)
        ends = [row.index(t) for t in cfg.stops if t in row]
        texts.append(tokenizer.decode(row[: min(ends)] if ends else row))
    return texts
