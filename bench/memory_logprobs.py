"""Peak memory of sequence_logprobs with and without LM-head chunking (issue 2).

    python bench/memory_logprobs.py [--batch 8 --seq 512 --layers 12]

Reads XLA's memory analysis of the compiled executables (no run needed, so it is exact and
quick even on a laptop): temp = scratch the program needs beyond its arguments and outputs.
Reports the forward (reference log-probs) and the gradient w.r.t. the params (policy side).
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.logprobs import model_sequence_logprobs
from dpo_jax.models import common
from dpo_jax.models.gpt2 import GPT2, GPT2Config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunks", default="0,4096,1024,256")
    a = ap.parse_args()
    cfg = GPT2Config(n_layer=a.layers, dtype=a.dtype)  # GPT-2 small: 768 wide, 12 heads, V=50257
    graphdef, params = nnx.split(common.abstract(GPT2, cfg))
    ids = jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32)

    def logps(p, ids, chunk):
        return model_sequence_logprobs(nnx.merge(graphdef, p), ids, jnp.ones_like(ids),
                                       jnp.ones_like(ids), chunk_size=chunk)[0].sum()

    print(f"{jax.devices()[0].device_kind}; B={a.batch} T={a.seq} V={cfg.vocab_size} "
          f"C={cfg.n_embd} layers={cfg.n_layer} dtype={cfg.dtype}")
    print(f"{'chunk':>6} {'forward temp MiB':>17} {'grad temp MiB':>14}")
    for chunk in [int(c) for c in a.chunks.split(",")]:
        fwd = jax.jit(logps, static_argnums=2).lower(params, ids, chunk).compile()
        grad = jax.jit(jax.grad(logps), static_argnums=2).lower(params, ids, chunk).compile()
        mib = lambda c: c.memory_analysis().temp_size_in_bytes / 2**20
        print(f"{chunk if chunk else 'off':>6} {mib(fwd):17.0f} {mib(grad):14.0f}")


if __name__ == "__main__":
    main()
