"""Real tokens per second of the DPO train step with padding, length buckets and packing (issue 17).

    python bench/packing.py                       # GPT-2 small shape, HH-like lengths, CPU
    python bench/packing.py --model smollm2       # SmolLM2-135M's shape
    python bench/packing.py --dist ultrafeedback --pairs 8 --layers 2   # quicker look

Pairs are drawn from ``bench/lengths.json`` (histograms shaped like Anthropic HH or
UltraFeedback; synthetic tokens), cut as a run with max_length 512 and max_completion_length
256 would (prompt <= 256 tokens, each completion <= 256). Modes (all with the completion-only
LM head, reference forward in the step, AdamW, float32 unless --dtype):

  pair               two rows per pair, padded to 512
  pair+buckets       padded to the smallest of 128/256/384/512 that fits the batch
  pair+packed        packing="balanced": units packed into the fewest rows that fit every batch
  pair+packed-exact  packing="exact": the unpacked run's batches (rows for the worst of them)
  shared+buckets     prefix sharing (prompt once per pair), buckets as above
  shared+packed      prefix sharing, packing="balanced"
  pair+budget        packing="budget": as many pairs as fill the rows a mean batch fills
  shared+budget      prefix sharing, packing="budget"

Every step function has static shapes, so a step's time depends only on its shape. The script
times each distinct shape a mode uses (best of --reps, all shapes of all modes interleaved
round-robin, after a warm-up call each) and weighs the times by how many batches of one epoch
have that shape: epoch time = sum(count x time). "real tok/s" = the epoch's prompt + completion
tokens of every chosen and rejected sequence (2p + c + r per pair: the same work in every mode,
padding and layout savings excluded) / epoch time. "padding" is the share of the positions a
mode computes that hold no token (the layout's own positions).
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_speed import SHAPES, jax_model  # noqa: E402

MAX_LENGTH, WINDOW = 512, 256
BUCKETS = (128, 256, 384)
MODES = {  # name: (layout, packing, buckets)
    "pair": ("pair", "none", ()),
    "pair+buckets": ("pair", "none", BUCKETS),
    "pair+packed": ("pair", "balanced", ()),
    "pair+packed-exact": ("pair", "exact", ()),
    "shared+buckets": ("prefix_sharing", "none", BUCKETS),
    "shared+packed": ("prefix_sharing", "balanced", ()),
    "pair+budget": ("pair", "budget", ()),
    "shared+budget": ("prefix_sharing", "budget", ()),
}


def sample_pairs(dist: str, n: int, vocab: int, seed: int = 0):
    from dpo_jax.data import TokenizedPairs
    spec = json.load(open(os.path.join(os.path.dirname(__file__), "lengths.json")))
    edges, rng = np.asarray(spec["edges"]), np.random.default_rng(seed)

    def draw(counts, cap):
        p = np.asarray(counts, float) / sum(counts)
        b = rng.choice(len(p), n, p=p)
        return np.minimum(rng.integers(edges[b], edges[b + 1]), cap)
    h = spec[dist]
    lens = draw(h["prompt"], MAX_LENGTH - WINDOW), draw(h["chosen"], WINDOW), \
        draw(h["rejected"], WINDOW)
    return TokenizedPairs(*[[rng.integers(1, vocab, k).astype(np.int32) for k in ls]
                            for ls in lens], {})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--dist", default="hh", choices=["hh", "ultrafeedback"])
    ap.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    ap.add_argument("--data", type=int, default=2048, help="pairs in the data (one epoch)")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (0 = the model's)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--modes", default=",".join(MODES))
    a = ap.parse_args()

    import dataclasses

    import jax
    import optax
    from flax import nnx
    from dpo_jax import data, layouts, models, packing, sharding, steps
    from dpo_jax.losses import LossConfig
    from dpo_jax.tuning.full import FullTuning
    from dpo_jax.models import attention, common

    shape = SHAPES[a.model]
    shape = dataclasses.replace(shape, layers=a.layers or shape.layers)
    cls, cfg0 = jax_model(shape, a.dtype)
    pairs = sample_pairs(a.dist, a.data, cfg0.vocab_size)
    graphdef0 = nnx.graphdef(common.abstract(cls, cfg0))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(cls(cfg0, rngs=nnx.Rngs(0)),
                                                        nnx.Param)))()
    optimizer = optax.adamw(1e-6)
    mesh = sharding.make_mesh(1, 1, 1)
    state, state_sh = sharding.init_state(mesh, params, optimizer, models.family_of(cfg0).rules)
    ref = jax.tree.map(lambda x, sh: jax.device_put(x, sh, may_alias=False), params,
                       state_sh["params"])
    del params

    runs = []  # (mode, shape key, count, step fn, batch)
    info = {}
    for name in a.modes.split(","):
        base, mode, buckets = MODES[name]
        layout = packing.make(base, WINDOW, packed=mode != "none")
        b = data.PairBatches(pairs, batch_size=a.pairs, max_length=MAX_LENGTH, pad_id=0,
                             buckets=buckets, layout=layout, seed=0,
                             balance=64 if mode == "balanced" else 0,
                             budget=mode == "budget")
        impl, why = attention.resolve(a.attention, platform=jax.default_backend(), dtype=a.dtype,
                                      head_dim=shape.head_dim, mask_forms={b.layout.mask_form},
                                      lengths=b.buckets)
        graphdef = nnx.graphdef(common.abstract(cls, dataclasses.replace(cfg0, attention=impl)))
        step = steps.make_train_step(FullTuning(graphdef), b.layout, LossConfig(beta=0.1),
                                     optimizer, lambda s: 1e-6, chunk_size=1024)
        plan = b._plan(0)
        shapes = {}
        for rows in plan:
            length = b.buckets[int(b.bucket_of[rows].max())]
            shapes.setdefault(length, []).append(rows)
        p = pairs
        real = sum(2 * len(p.prompt[i]) + len(p.chosen[i]) + len(p.rejected[i])
                   for rows in plan for i in rows)
        info[name] = dict(real=real, padding=b.padding_fraction(), attention=impl, why=why,
                          shapes={}, pairs=sum(len(r) for r in plan))
        for length, group in sorted(shapes.items()):
            batch = sharding.shard_batch(mesh, data.stack_batches([b.collate(group[0])]))
            rows_n = batch["input_ids"].shape[1]
            info[name]["shapes"][f"{rows_n}x{length}"] = len(group)
            runs.append((name, f"{rows_n}x{length}", len(group), step, batch))
        print(f"{name}: {len(plan)} batches, shapes {info[name]['shapes']}, padding "
              f"{100 * info[name]['padding']:.1f}%, attention {impl}", flush=True)

    times = {(r[0], r[1]): [] for r in runs}
    for rep in range(a.reps + 1):
        for name, key, _, step, batch in runs:
            t = time.perf_counter()
            state, m = step(state, ref, batch)
            jax.block_until_ready(m)
            if rep:
                times[(name, key)].append(time.perf_counter() - t)
        print(f"rep {rep} done", flush=True)

    print(f"\n{a.model} shape ({shape.layers} layers), {a.dist}-like lengths, {a.pairs} pairs per "
          f"batch, {a.data} pairs, {jax.devices()[0].device_kind}, {a.dtype}\n")
    print("| mode | batch shapes (rows x length: batches) | pairs per batch | padding "
          "| epoch time | real tok/s | vs pair+buckets |")
    print("|---|---|---|---|---|---|---|")
    out = {}
    for name in info:
        epoch = sum(count * min(times[(name, key)]) for n, key, count, _, _ in runs
                    if n == name)
        out[name] = dict(info[name], epoch_s=epoch, tok_s=info[name]["real"] / epoch,
                         step_s={k: statistics.median(times[(name, k)])
                                 for k in info[name]["shapes"]})
    ref_tok = out.get("pair+buckets", {}).get("tok_s")
    for name, o in out.items():
        shapes_txt = ", ".join(f"{k}: {v}" for k, v in o["shapes"].items())
        vs = f"{o['tok_s'] / ref_tok:.2f}x" if ref_tok else "-"
        per = o["pairs"] / sum(o["shapes"].values())
        print(f"| {name} | {shapes_txt} | {per:.2f} | {100 * o['padding']:.1f}% "
              f"| {o['epoch_s']:.1f} s | {o['tok_s']:.0f} | {vs} |")
    print("\n" + json.dumps(out))


if __name__ == "__main__":
    main()
