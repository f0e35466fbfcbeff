"""Where a DPO step's time goes: each part's forward and forward+backward, timed alone (issue 7).

    python bench/step_parts.py            # GPT-2 small, the step_speed.py workload (8 x 128)

Parts, on the shapes of the plain step (8 rows of 128 tokens; the head also on the 8 x 64
completion positions the completion-only head keeps):
  trunk       embeddings + 12 scanned blocks + ln_f, gradient w.r.t. every param
  head        tied LM head + float32 log-softmax + label gather on all 8 x 127 positions
  head@compl  the same on the 8 x 64 gathered completion positions (sequence_logprobs_at)
  adamw       the optimizer update of the 124M params
"grad/fwd" is the forward+backward time over the forward time: 3 is the FLOP ideal (the
backward does twice the forward's matmuls). GFLOP/s counts the analytic matmul FLOPs.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpo_jax.logprobs import sequence_logprobs_at, sequence_logprobs_from_hidden
from dpo_jax.models.gpt2 import GPT2, GPT2Config

ROWS, SEQ, PROMPT = 8, 128, 64


def timed(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    cfg = GPT2Config(n_layer=a.layers)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (ROWS, SEQ)), jnp.int32)
    mask = jnp.ones((ROWS, SEQ), jnp.int32)
    loss_mask = mask.at[:, :PROMPT].set(0)
    c, v = cfg.n_embd, cfg.vocab_size
    hidden = jnp.asarray(rng.standard_normal((ROWS, SEQ, c)), jnp.float32)
    wte = params["wte"]["weight"][...]
    pos = jnp.broadcast_to(jnp.arange(PROMPT - 1, SEQ - 1), (ROWS, SEQ - PROMPT))[:, None]
    labels = ids[:, PROMPT:][:, None]
    smask = jnp.ones_like(labels)

    def trunk(p):
        return nnx.merge(graphdef, p).hidden_states(ids, mask).sum()

    def head(h, w):
        return sequence_logprobs_from_hidden(h, w, ids, loss_mask, chunk_size=0)[0].sum()

    def head_at(h, w):
        return sequence_logprobs_at(h, w, pos, labels, smask, chunk_size=0)[0].sum()

    tokens = ROWS * SEQ
    block = 2 * (c * 3 * c + c * c + 2 * c * 4 * c)
    flops = {"trunk": a.layers * (tokens * block + 4 * ROWS * SEQ * SEQ * c),
             "head": 2 * ROWS * (SEQ - 1) * c * v, "head@compl": 2 * ROWS * (SEQ - PROMPT) * c * v}
    parts = {"trunk": (trunk, (params,), 0), "head": (head, (hidden, wte), (0, 1)),
             "head@compl": (head_at, (hidden, wte), (0, 1))}
    print(f"{jax.devices()[0].device_kind}, GPT-2 small shape with {a.layers} layers, "
          f"{ROWS} x {SEQ} tokens, float32\n")
    print("| part | forward | fwd+bwd | grad/fwd | fwd GFLOP/s | fwd+bwd GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, (fn, args, argnums) in parts.items():
        f = timed(jax.jit(fn), *args, reps=a.reps)
        g = timed(jax.jit(jax.grad(fn, argnums=argnums)), *args, reps=a.reps)
        print(f"| {name} | {1e3 * f:.0f} ms | {1e3 * g:.0f} ms | {g / f:.2f} | "
              f"{flops[name] / f / 1e9:.0f} | {3 * flops[name] / g / 1e9:.0f} |", flush=True)
    opt = optax.adamw(1e-5)
    state = opt.init(params)

    def update(p, s):
        u, s = opt.update(p, s, p)  # the params stand in for a gradient of the same shapes
        return optax.apply_updates(p, u), s

    t = timed(jax.jit(update), params, state, reps=a.reps)
    print(f"| adamw | {1e3 * t:.0f} ms | - | - | - | - |")


if __name__ == "__main__":
    main()
