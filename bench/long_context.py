"""The longest pair a per-device memory budget trains, by model shape and context axis (issue 29).

    python bench/long_context.py --model qwen3-0.6b --contexts 1,4,8 \\
        --lengths 4096,8192,16384,32768,65536 --budgets 16,40,80 --lora-rank 16

For each context axis size N and each row length (ascending), ``bench/memory.py`` compiles the
DPO train step of one pair (two rows of that many positions) on N simulated CPU devices
(``--mesh 1,1,1,1,N``: each row's positions split over the context axis, ring attention), bf16
compute and reference, remat, and reads XLA's memory analysis: per-device step arguments +
temporaries, without the float32 copy of the bf16 weights the CPU compiler hoists out of the
layer loop (``--no-hoist``; ``--hoist`` keeps it). Lengths stop growing for an N once the
largest budget is exceeded. Printed: the table of measured MiB per device, then the longest
measured length that fits each budget (GB = 1e9 bytes), with LoRA (``--lora-rank``) and,
unless ``--lora-only``, full fine-tuning. Each point
is a separate process (the simulated device count is fixed when XLA starts) and compiles
without running: minutes per point for a 1B model on a small CPU.

    python bench/long_context.py --time --lengths 2048,8192,32768 --contexts 8
    python bench/long_context.py --time --lengths 2048,4096,8192 --contexts 1 --orders xla,tiled

On a GPU, ``--run 3`` runs each compiled step as well (``bench/memory.py --run``: zero weights,
one random pair, each point in a process of its own) and adds the device's real peak memory,
seconds per step and tokens/s; the budgets are then read from the real peak, and a length the
device cannot hold reads "OOM". Lengths stop growing at an OOM or, as without ``--run``, once
the largest budget is exceeded. One GPU is context 1.

``--time`` instead runs real train steps of a small Llama-family model (SmolLM2-135M's width and
heads, 2 layers, vocab 4096) on one pair of rows of each length, positions split over the
context axis (N simulated CPU devices), and prints the median step time per token and its ratio
to the shortest length's: what grows is attention's quadratic part. Each step is compiled ahead
of time, and every step run is timed (none is run to warm up).
"""

import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROW = re.compile(r"^\s*(full|LoRA r\d+)\s+\S+\s+(?:[\d.]+\s+){3}\S+(?:\s+\(base\))?\s+"
                 r"([\d.]+)\s+([\d.]+)(?:\s+(OOM|-|[\d.]+)(?:\s+([\d.]+)\s+([\d.]+))?)?\s*$")


def measure(model, length, context, lora_rank, lora_only, attention="ring", hoist=False,
            run=0, kernel="xla", mlp_tile=0):
    """{tuning: (MiB per device (arguments + temporaries) of one compiled step, the real peak
    MiB or "OOM", s per step, tokens/s)}, the last three "-" unless ``run`` steps ran (then the
    compiler keeps its passes); ``hoist``: keep the CPU compiler's hoisted float32 copy of the
    bf16 weights (else bench/memory.py's ``--no-hoist``)."""
    cmd = [sys.executable, os.path.join(HERE, "memory.py"), "--model", model, "--pairs", "1",
           "--seq", str(length), "--mesh", f"1,1,1,1,{context}", "--devices", str(context),
           "--dtype", "bfloat16", "--ref-dtype", "bfloat16", "--remat",
           "--context-attention", attention, "--attention", kernel, "--mlp-tile", str(mlp_tile)]
    if run:  # real steps: the compiler keeps all its passes
        cmd += ["--run", str(run)]
    elif not hoist:
        cmd.append("--no-hoist")
    if lora_rank:
        cmd += ["--lora-rank", str(lora_rank)] + (["--lora-only"] if lora_only else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            ran = [x if x in ("OOM", "-") else float(x) for x in m.group(4, 5, 6) if x]
            found[m.group(1)] = (float(m.group(2)) + float(m.group(3)),
                                 *(ran + ["-"] * (3 - len(ran))))
    return found


def time_steps(lengths, context, steps=3, orders=("zigzag",)):
    """Median seconds per train step of a small model at each row length (one pair), per ring
    order (``common.CONTEXT_ORDER``), the orders' steps interleaved: {(length, order): s}. An
    "order" named after an attention kernel ("xla", "tiled") instead compiles the model with
    that kernel (config key ``attention``; on one device, the kernels side by side); a
    "+mlpN" suffix runs the MLP in tiles of N positions (``common.feed_forward``)."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={context}")
    sys.path.insert(0, os.path.dirname(HERE))
    import dataclasses
    import statistics
    import time
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from dpo_jax import data, layouts, sharding, steps as steps_lib
    from dpo_jax.losses import LossConfig
    from dpo_jax.models import attention, common
    from dpo_jax.models.llama import FAMILY, Llama, LlamaConfig
    default_tile = attention.RING_TILE
    from dpo_jax.tuning.full import FullTuning
    mesh = sharding.make_mesh(1, 1, 1, context=context)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, max_position_embeddings=max(lengths), remat=True,
                      mesh_axes=sharding.mesh_axes(mesh))
    params = nnx.to_pure_dict(nnx.state(Llama(dataclasses.replace(cfg, mesh_axes=()),
                                              rngs=nnx.Rngs(0)), nnx.Param))
    opt = optax.adamw(1e-5)
    out = {}
    for length in lengths:
        rng = np.random.default_rng(0)
        half = length // 2
        tp = data.TokenizedPairs([rng.integers(0, 4096, half).astype(np.int32)],
                                 [rng.integers(0, 4096, half).astype(np.int32)],
                                 [rng.integers(0, 4096, half).astype(np.int32)], {})
        b = data.PairBatches(tp, batch_size=1, max_length=length, pad_id=0, shuffle=False,
                             length_multiple=sharding.context_multiple(mesh))
        batch = data.stack_batches([b.collate(np.arange(1))])
        _, state_sh = sharding.init_state(mesh, params, opt, FAMILY.rules)
        batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        run = {}
        for order in orders:  # traced and compiled with its order (and "@N": ring tiles of N)
            spec, _, mlp = order.partition("+mlp")
            name, _, tile = spec.partition("@")
            kernel = name if name in attention.IMPLEMENTATIONS else "xla"
            common.CONTEXT_ORDER = "zigzag" if kernel == name else name
            attention.RING_TILE = int(tile) if tile else default_tile
            graphdef = nnx.graphdef(common.abstract(Llama, dataclasses.replace(
                cfg, attention=kernel, mlp_tile=int(mlp or 0))))
            step = steps_lib.make_train_step(
                FullTuning(graphdef), layouts.make("pair"), LossConfig(), opt, lambda s: 1e-5,
                chunk_size=256, in_shardings=(state_sh, state_sh["params"], batch_sh),
                out_shardings=(state_sh, jax.sharding.NamedSharding(
                    mesh, jax.sharding.PartitionSpec())))
            state, _ = sharding.init_state(mesh, params, opt, FAMILY.rules)
            ref = sharding.place(params, state_sh["params"])  # the step donates the state
            # compiled ahead, so no untimed step runs first (a 32k step is tens of minutes here)
            step = step.lower(state, ref, sharding.shard_batch(mesh, batch)).compile()
            run[order] = [step, state, ref, []]
        for _ in range(steps):
            for order in orders:
                step, state, ref, times = run[order]
                t = time.perf_counter()
                state, m = step(state, ref, sharding.shard_batch(mesh, batch))
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
                run[order][1] = state
        for order in orders:
            out[length, order] = statistics.median(run[order][3])
            print(f"{length} tokens / row, {order} order: {out[length, order]:.2f} s per step",
                  flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--contexts", default="1,8")
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    ap.add_argument("--budgets", default="16,40,80", help="per-device GB")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-only", action="store_true")
    ap.add_argument("--time", action="store_true", help="time real steps of a small model")
    ap.add_argument("--steps", type=int, default=3, help="--time: timed steps per length")
    ap.add_argument("--orders", default="zigzag",
                    help="--time: ring attention's orders to time side by side (zigzag,index); "
                         "ORDER@N: with query tiles of N (attention.RING_TILE); or attention "
                         "kernels (xla,tiled: one device's); ORDER+mlpN: the MLP in tiles of N "
                         "positions")
    ap.add_argument("--hoist", action="store_true",
                    help="memory: keep the CPU compiler's hoisted float32 copy of the bf16 "
                         "weights (bench/memory.py --no-hoist is the default here)")
    ap.add_argument("--context-attention", default="ring",
                    choices=("ring", "ring-index-order", "all-gather"),
                    help="memory: what attention over the context axis is (bench/memory.py)")
    ap.add_argument("--run", type=int, default=0,
                    help="memory, on a GPU: also run this many steps of each point: the real "
                         "peak, s per step and tokens/s; budgets from the real peak")
    ap.add_argument("--attention", default="xla", choices=("xla", "cudnn", "splash", "tiled"),
                    help="memory: the attention kernel (bench/memory.py --attention)")
    ap.add_argument("--mlp-tile", type=int, default=0,
                    help="memory: the MLP in tiles of this many positions (bench/memory.py "
                         "--mlp-tile; config key mlp='tiled' takes 2048)")
    a = ap.parse_args()
    if a.time:
        lengths = sorted(int(x) for x in a.lengths.split(","))
        n = int(a.contexts.split(",")[-1])
        orders = a.orders.split(",")
        t = time_steps(lengths, n, a.steps, orders)
        print(f"\n| tokens / row | context axis | order | s per step | us per token | "
              f"vs {lengths[0]} | vs {orders[0]} |")
        print("|---|---|---|---|---|---|---|")
        per = {k: v / (2 * k[0]) for k, v in t.items()}  # two rows of k positions
        for k in lengths:
            for o in orders:
                print(f"| {k} | {n} | {o} | {t[k, o]:.2f} | {per[k, o] * 1e6:.1f} | "
                      f"{per[k, o] / per[lengths[0], o]:.2f}x | "
                      f"{t[k, o] / t[k, orders[0]]:.2f}x |")
        return
    budgets = [float(b) for b in a.budgets.split(",")]
    rows, runs = [], []  # (tuning, context, length, MiB the budgets read), measure's tuples
    for n in (int(c) for c in a.contexts.split(",")):
        for length in sorted(int(x) for x in a.lengths.split(",")):
            got = measure(a.model, length, n, a.lora_rank, a.lora_only, a.context_attention,
                          a.hoist, run=a.run, kernel=a.attention, mlp_tile=a.mlp_tile)
            for tuning, (mib, peak, step, tps) in got.items():
                runs.append((tuning, n, length, mib, peak, step, tps))
                if peak != "OOM":  # the real peak where the device counts one
                    rows.append((tuning, n, length, mib if peak == "-" else peak))
                print(f"{a.model} {tuning}: context {n}, {length} tokens / row: {mib:.0f} MiB "
                      f"per device" + (f" compiled, run: peak {peak}, {step} s per step"
                                       if a.run else ""), flush=True)
            used = [r[3] for r in rows if r[1:3] == (n, length)]
            if len(used) < len(got) or min(used) * 2**20 > max(budgets) * 1e9:
                break  # out of memory, or over every budget
    if a.run:
        print("\n| tuning | context axis | tokens / row | compiled MiB | peak MiB | s / step | "
              "tokens/s |\n|---|---|---|---|---|---|---|")
        num = lambda x, f: x if isinstance(x, str) else format(x, f)
        for tuning, n, length, mib, peak, step, tps in runs:
            print(f"| {tuning} | {n} | {length} | {mib:.0f} | {num(peak, '.0f')} | "
                  f"{num(step, '.3f')} | {num(tps, '.0f')} |")
    else:
        print("\n| tuning | context axis | tokens / row | MiB per device |\n|---|---|---|---|")
        for tuning, n, length, mib in rows:
            print(f"| {tuning} | {n} | {length} | {mib:.0f} |")
    longest(rows, budgets)


def longest(rows, budgets):
    """The longest measured length within each budget, per tuning and context axis."""
    print("\n| tuning | context axis | " + " | ".join(f"longest within {b:g} GB"
                                                     for b in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for tuning in sorted({r[0] for r in rows}):
        for n in sorted({r[1] for r in rows}):
            mine = [r for r in rows if r[0] == tuning and r[1] == n]
            best = [max([r[2] for r in mine if r[3] * 2**20 <= b * 1e9], default=0)
                    for b in budgets]
            print(f"| {tuning} | {n} | " + " | ".join(str(x or "-") for x in best) + " |")


if __name__ == "__main__":
    sys.exit(main())
