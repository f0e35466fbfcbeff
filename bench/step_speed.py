"""DPO train-step speed: dpo_jax in each mode against a hand-written PyTorch baseline (issue 7).

    python bench/step_speed.py                 # all modes, GPT-2 small, 4 pairs x (64+64+64)
    python bench/step_speed.py --modes plain,torch --steps 10 --layers 2   # quicker look

Workload: GPT-2-small shape (12 layers, 12 heads, width 768, vocab 50257), random init, float32,
4 pairs per step, prompt 64 tokens, chosen 64, rejected 64, beta 0.1, AdamW. Modes:
  plain        two rows per pair, LM head on every position, reference forward in the step
  head         + LM head only where completion tokens are scored
  shared       + prefix sharing: one row prompt + chosen + rejected
  precomputed  + reference log-probs precomputed (no reference forward in the step)
  torch        transformers GPT2LMHeadModel, chosen and rejected in one forward, reference under
               no_grad, torch.optim.AdamW, float32
Each mode runs in its own process (peak RSS is that process's). Step time is the median of
--steps timed steps after 2 warm-up steps. tokens/s counts the tokens of the chosen and the
rejected sequences (prompt + completion each: 4 x 2 x 128 = 1024 per step) in every mode, so the
numbers compare the same work. MFU = model FLOPs of the plain step (analytic: 3x the policy
forward + the reference forward, full attention and head) / step time / the fp32 matmul peak
measured first with XLA on this machine; the savings modes do less, so theirs is an effective
MFU. (XLA's cost analysis is not reported: it counts the scanned block once, not n_layer times.)
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PAIRS, PROMPT, COMPLETION = 4, 64, 64


def model_flops(layers, width, vocab, rows, seq):
    """Analytic FLOPs of one forward over rows x seq tokens (matmuls only, full attention)."""
    tokens = rows * seq
    per_layer = 2 * tokens * (width * 3 * width + width * width + 2 * width * 4 * width)
    attention = 2 * 2 * rows * seq * seq * width
    head = 2 * tokens * width * vocab
    return layers * (per_layer + attention) + head


def matmul_peak(n=2048, reps=10):
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def synthetic_pairs(vocab, seed=0):
    import numpy as np
    from dpo_jax.data import TokenizedPairs
    rng = np.random.default_rng(seed)
    mk = lambda n: [rng.integers(0, vocab, n).astype(np.int32) for _ in range(PAIRS)]
    return TokenizedPairs(mk(PROMPT), mk(COMPLETION), mk(COMPLETION), {})


def run_jax(mode, a):
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from dpo_jax import data, sharding, step
    from dpo_jax.losses import LossConfig
    from dpo_jax.model import GPT2, GPT2Config, abstract_model

    cfg = GPT2Config(n_layer=a.layers, remat=False)
    graphdef = nnx.graphdef(abstract_model(cfg))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(GPT2(cfg, rngs=nnx.Rngs(0)),
                                                        nnx.Param)))()
    optimizer = optax.adamw(1e-5)
    mesh = sharding.make_mesh(1, 1, 1)
    state, state_sh = sharding.init_state(mesh, params, optimizer)
    ref = jax.tree.map(lambda x, sh: jax.device_put(x, sh, may_alias=False), params,
                       state_sh["params"])
    del params
    layout = "prefix_sharing" if mode in ("shared", "precomputed") else "pair"
    window = 0 if mode == "plain" else COMPLETION
    pairs_ = synthetic_pairs(cfg.vocab_size)
    max_length = PROMPT + COMPLETION
    batches = data.PairBatches(pairs_, batch_size=PAIRS, max_length=max_length, pad_id=0,
                               layout=layout, completion_window=window, seed=0)
    loss_cfg = LossConfig(beta=0.1)
    if mode == "precomputed":
        ref_fn = step.make_ref_logps_fn(graphdef, chunk_size=a.chunk)
        c, r = ref_fn(ref, batches.collate(np.arange(PAIRS)))
        pairs_.ref_chosen, pairs_.ref_rejected = np.asarray(c), np.asarray(r)
        ref = None
    first = data.stack_batches([next(batches)])
    # as the trainer does: layouts pinned, so the state a step returns is the state it takes
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ref_sh = None if ref is None else state_sh["params"]
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in first.items()}
    train_step = step.make_train_step(graphdef, graphdef, loss_cfg, optimizer, lambda s: 1e-5,
                                      chunk_size=a.chunk, in_shardings=(state_sh, ref_sh, batch_sh),
                                      out_shardings=(state_sh, replicated))
    loss_fn = jax.jit(step.make_loss_fn(graphdef, graphdef, loss_cfg, a.chunk))

    times, fwd_times = [], []
    for i in range(a.steps + 2):
        b = data.stack_batches([next(batches)])  # new contents every step, same shapes
        t = time.perf_counter()
        state, m = train_step(state, ref, sharding.shard_batch(mesh, b))
        jax.block_until_ready(m)
        if i >= 2:
            times.append(time.perf_counter() - t)
    for i in range(min(a.steps, 5) + 1):  # forward only (loss), for the backward/forward ratio
        b = {k: v[0] for k, v in data.stack_batches([next(batches)]).items()}
        t = time.perf_counter()
        jax.block_until_ready(loss_fn(state["params"], ref, b))
        if i >= 1:
            fwd_times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "fwd_s": statistics.median(fwd_times),
            "compilations": train_step._cache_size(),
            "loss": float(m["loss"])}


def run_torch(a):
    import copy
    import numpy as np
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=a.layers, attn_implementation="sdpa")
    policy = transformers.GPT2LMHeadModel(cfg).train()
    for mod in policy.modules():  # DPO trains without dropout
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    pairs_ = synthetic_pairs(cfg.vocab_size)

    def make_batch():
        ids = np.stack([np.concatenate([p, c]) for p, c in zip(pairs_.prompt, pairs_.chosen)]
                       + [np.concatenate([p, r]) for p, r in zip(pairs_.prompt, pairs_.rejected)])
        ids = torch.tensor(ids, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.float32)
        mask[:, PROMPT:] = 1.0
        return ids, mask

    def seq_logps(model, ids, mask):
        logits = model(ids).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (lp * mask[:, 1:]).sum(-1)

    def train_step(ids, mask):
        logps = seq_logps(policy, ids, mask)
        with torch.no_grad():
            ref_logps = seq_logps(ref, ids, mask)
        pc, pr = logps[:PAIRS], logps[PAIRS:]
        rc, rr = ref_logps[:PAIRS], ref_logps[PAIRS:]
        loss = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    times, fwd_times = [], []
    for i in range(a.steps + 2):
        ids, mask = make_batch()
        t = time.perf_counter()
        loss = train_step(ids, mask)
        if i >= 2:
            times.append(time.perf_counter() - t)
    with torch.no_grad():
        for i in range(min(a.steps, 5) + 1):
            ids, mask = make_batch()
            t = time.perf_counter()
            seq_logps(policy, ids, mask), seq_logps(ref, ids, mask)
            if i >= 1:
                fwd_times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "fwd_s": statistics.median(fwd_times),
            "compilations": None, "loss": float(loss)}


def child(a):
    out = run_torch(a) if a.child == "torch" else run_jax(a.child, a)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default="plain,head,shared,precomputed,torch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=0, help="LM-head chunk; 0 = off")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    import platform
    peak = matmul_peak()
    width, vocab = 768, 50257
    rows, seq = 2 * PAIRS, PROMPT + COMPLETION
    fwd = model_flops(a.layers, width, vocab, rows, seq)
    plain_flops = 3 * fwd + fwd  # policy forward + backward (2x), reference forward
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"XLA fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; model FLOPs of the plain step "
          f"{plain_flops / 1e9:.0f} GFLOP")
    results = {}
    for mode in a.modes.split(","):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps),
                            "--layers", str(a.layers), "--chunk", str(a.chunk)],
                           capture_output=True, text=True, env=env)
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{mode}: failed\n{r.stderr[-2000:]}")
            continue
        results[mode] = json.loads(line[0][7:])
        print(f"  {mode}: done", file=sys.stderr)
    tokens = rows * seq
    base = results.get("torch", {}).get("step_s")
    print("\n| mode | step (median) | tokens/s | vs torch | MFU | step/forward | compilations "
          "| peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        vs = f"{base / r['step_s']:.2f}x" if base else "-"
        mfu = plain_flops / r["step_s"] / peak
        comp = r["compilations"] if r["compilations"] is not None else "-"
        print(f"| {mode} | {1000 * r['step_s']:.0f} ms | {tokens / r['step_s']:.0f} | {vs} | "
              f"{100 * mfu:.0f}% | {r['step_s'] / r['fwd_s']:.2f} | {comp} | "
              f"{r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
