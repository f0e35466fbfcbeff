"""Per-device memory of a DPO train step for a model shape and a mesh (issues 6, 15).

    python bench/memory.py --model gpt2 --pairs 8 --seq 512                    # one device
    python bench/memory.py --model gpt2-medium --mesh 2,2,2 --devices 8 --remat
    python bench/memory.py --model gpt2 --compare-remat                      # remat off vs on
    python bench/memory.py --model qwen3-0.6b --dtype bfloat16 --remat         # Llama family
    python bench/memory.py --model llama-3.2-1b --mesh 1,8,1 --devices 8 --remat
    python bench/memory.py --model gemma-3-1b --dtype bfloat16 --remat --seq 8192 --pairs 1
    python bench/memory.py --model qwen3-0.6b --mesh 1,1,1,1,8 --devices 8 --pairs 1 \
        --seq 32768 --dtype bfloat16 --ref-dtype bfloat16 --remat --lora-rank 16   # context 8
    python bench/memory.py --model llama-3.1-8b --pairs 1 --seq 1024 --dtype bfloat16 \
        --ref-dtype bfloat16 --remat --lora-rank 16 --lora-only --quantize-base nf4  # QLoRA
    python bench/memory.py --model qwen3-30b-a3b --mesh 1,8,1,8 --devices 64 --pairs 64 \
        --seq 1024 --dtype bfloat16 --ref-dtype bfloat16 --remat --lora-rank 16

Nothing is run and no weights are needed: the train step is compiled from abstract inputs
(ShapeDtypeStructs with their shardings) and XLA's memory analysis of the executable is read.
Per device: params, optimizer state and reference params from their shardings; "temp" is what
the step needs beyond its inputs and outputs, i.e. activations kept for the backward pass and
scratch. --devices N simulates N CPU devices.

    python bench/memory.py --model gemma-3-1b --pairs 1 --seq 8192 --dtype bfloat16 \
        --ref-dtype bfloat16 --remat --lora-rank 16 --run 3          # on a GPU: real peak

``--run STEPS`` also runs each case: the compiled step on zero-filled weights and one random
pair batch placed with the same shardings, STEPS steps after a first one, each case in a
process of its own (the device's peak counter is per process). It adds the device's real peak
(``memory_stats()['peak_bytes_in_use']``, a GPU's or TPU's; the CPU has none), the median
seconds per step and the tokens per second, or "OOM" where the device ran out of memory.
"""

import argparse
import dataclasses
import os
import sys

GPT2_SIZES = {  # (n_layer, n_embd, n_head)
    "tiny": (2, 64, 4), "gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25),
}
LLAMA_SHAPES = {  # the shapes of the published configs (random weights; nothing is downloaded)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, qk_norm=True,
                       tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, tie_word_embeddings=True, rope_type="llama3",
                         rope_factor=32.0, rope_theta=500000.0),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, tie_word_embeddings=False, rope_type="llama3",
                         rope_factor=8.0, rope_theta=500000.0),
}
GEMMA_SHAPES = {  # Gemma 2 2B and Gemma 3 1B as published (windows and soft-caps included)
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304,
                       intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256.0,
                       sliding_window=4096, local_layers=tuple(i % 2 == 0 for i in range(26)),
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                       intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256.0,
                       sliding_window=512, local_layers=tuple(bool((i + 1) % 6)
                                                              for i in range(26)),
                       qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0),
}
MOE_SHAPES = {  # Qwen3-30B-A3B and Mixtral-8x7B as published
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, qk_norm=True),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         moe_intermediate_size=14336, num_experts=8, num_experts_per_tok=2,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, norm_topk_prob=True),
}
PRESETS = sorted(GPT2_SIZES) + sorted(LLAMA_SHAPES) + sorted(GEMMA_SHAPES) + sorted(MOE_SHAPES)


def model_config(name: str, **compute):
    """(module class, family config) of a preset."""
    if name in GPT2_SIZES:
        from dpo_jax.models.gpt2 import GPT2, GPT2Config
        n_layer, n_embd, n_head = GPT2_SIZES[name]
        return GPT2, GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, **compute)
    if name in GEMMA_SHAPES:
        from dpo_jax.models.gemma import Gemma, GemmaConfig
        return Gemma, GemmaConfig(max_position_embeddings=131072, **GEMMA_SHAPES[name],
                                  **compute)
    if name in MOE_SHAPES:
        from dpo_jax.models.moe import MoE, MoEConfig
        return MoE, MoEConfig(max_position_embeddings=32768, **MOE_SHAPES[name], **compute)
    from dpo_jax.models.llama import Llama, LlamaConfig
    return Llama, LlamaConfig(max_position_embeddings=131072, **LLAMA_SHAPES[name], **compute)


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=PRESETS)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (global)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor[,expert[,context]]")
    ap.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ref-dtype", default="", help='"" = float32, or bfloat16')
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--remat-policy", default="nothing_saveable")
    ap.add_argument("--compare-remat", action="store_true", help="report remat off and on")
    ap.add_argument("--chunk", type=int, default=1024, help="LM-head chunk (positions)")
    ap.add_argument("--lora-only", action="store_true", help="with --lora-rank: skip full tuning")
    ap.add_argument("--quantize-base", default="", choices=("", "nf4", "int8", "fp8"),
                    help="with --lora-rank: also QLoRA, the base's Linear matrices in NF4, "
                         "int8 or FP8 (quantize_base), beside LoRA on the --ref-dtype base")
    ap.add_argument("--quantize-embeddings", action="store_true",
                    help="with --quantize-base: a further case, the embedding tables "
                         "quantized too")
    ap.add_argument("--double-quant", action="store_true",
                    help="with --quantize-base nf4: a case with NF4's scales double quantized "
                         "(double_quant)")
    ap.add_argument("--no-hoist", action="store_true",
                    help="disable XLA's while-loop-invariant code motion. The CPU computes bf16 "
                         "matmuls in float32, and that pass hoists the float32 conversion of the "
                         "layer-stacked weights out of the layer loop: a float32 copy of every "
                         "weight in the temporaries, which an accelerator with bf16 matmuls "
                         "does not make (measured: Llama-3.2-1B LoRA on a bf16 base, 6066 -> "
                         "2218 MiB of temporaries)")
    ap.add_argument("--context-attention", default="ring",
                    choices=("ring", "ring-index-order", "all-gather"),
                    help="over a context axis: ring attention in zig-zag order (the default), "
                         "in the row's order (no causal skipping), or all-gathered keys")
    ap.add_argument("--attention", default="xla", choices=("xla", "cudnn", "splash", "tiled"),
                    help="the attention kernel (cudnn: a GPU, bfloat16, heads up to 128; "
                         "tiled: XLA in tiles, no (T x T) logits)")
    ap.add_argument("--mlp-tile", type=int, default=0,
                    help="> 0: the MLP in tiles of this many positions per row (config key "
                         "mlp='tiled' takes 2048); 0: whole rows")
    ap.add_argument("--run", type=int, default=0,
                    help="> 0: also run each case this many timed steps (after one untimed): "
                         "the device's real peak memory, seconds per step, tokens/s")
    ap.add_argument("--case", type=int, default=-1, help=argparse.SUPPRESS)  # --run's child
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="> 0: LoRA adapters (attention + MLP) on a frozen base, which is also "
                         "the reference; also reports full fine-tuning for comparison")
    return ap.parse_args()


def main():
    a = parse()
    if a.double_quant and a.quantize_base != "nf4":
        sys.exit("--double-quant double quantizes NF4's scales: pass --quantize-base nf4")
    if a.devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={a.devices}")
    if a.no_hoist:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_disable_hlo_passes=while-loop-invariant-code-motion")
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dpo_jax import layouts, models, quant, sharding, steps
    from dpo_jax.losses import LossConfig
    from dpo_jax.tuning.full import FullTuning
    from dpo_jax.models import common

    common.CONTEXT_ATTENTION = "all_gather" if a.context_attention == "all-gather" else "ring"
    common.CONTEXT_ORDER = "index" if a.context_attention == "ring-index-order" else "zigzag"
    sizes = [int(x) for x in a.mesh.split(",")]
    mesh = sharding.make_mesh(*sizes[:3], expert=sizes[3] if len(sizes) > 3 else 1,
                              context=sizes[4] if len(sizes) > 4 else 1)
    model_cls, base = model_config(a.model, dtype=a.dtype, remat=a.remat,
                                   remat_policy=a.remat_policy, attention=a.attention,
                                   mlp_tile=a.mlp_tile,
                                   mesh_axes=sharding.mesh_axes(mesh))
    rules = models.family_of(base).rules
    sharding.check_model_fits(mesh, base, a.pairs)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
    mib = lambda b: b / 2**20

    def per_device(tree):
        total = 0
        for leaf in jax.tree.leaves(tree):
            shard = leaf.sharding.shard_shape(leaf.shape)
            total += int(jax.numpy.prod(jnp.array(shard))) * jnp.dtype(leaf.dtype).itemsize
        return total

    rows = []
    cases = [(r, 0, "") for r in ([False, True] if a.compare_remat else [a.remat])]
    if a.lora_rank:
        cases = [] if a.lora_only else cases
        cases += [(a.remat, a.lora_rank, "")]
        if a.quantize_base:
            cases += [(a.remat, a.lora_rank, a.quantize_base)]
        if a.quantize_base and a.double_quant:
            cases += [(a.remat, a.lora_rank, a.quantize_base + "+dq")]
        if a.quantize_base and a.quantize_embeddings:
            cases += [(a.remat, a.lora_rank, a.quantize_base + "+dq+emb" if a.double_quant
                       else a.quantize_base + "+emb")]
    if a.run and a.case < 0:  # each case in a process of its own: the peak is per process
        return run_each_case(len(cases))
    if a.case >= 0:
        cases = [cases[a.case]]
    for remat, rank, quantize in cases:
        cfg = dataclasses.replace(base, remat=remat)
        graphdef, abstract = nnx.split(common.abstract(model_cls, cfg))
        params = nnx.to_pure_dict(abstract)
        specs = sharding.param_specs(params, rules)
        sharding.check_divisible(mesh, params, specs)
        named = sharding.named(mesh, specs)
        tuning = FullTuning(graphdef)
        trainable, train_rules = params, rules
        if rank:  # trainable: the adapters; frozen: the base, which is the reference
            from dpo_jax.tuning import lora
            family = models.family_of(cfg)
            tuning = lora.LoRATuning(family, cfg, lora.LoRAConfig(rank, 2.0 * rank, 0.0,
                                                                   family.lora_target,
                                                                   quantize.split("+")[0],
                                                                   "+emb" in quantize,
                                                                   "+dq" in quantize))
            trainable = jax.eval_shape(tuning.init_adapters(0))
            train_rules = tuning.rules(rules)
        train_specs = sharding.param_specs(trainable, train_rules)
        make = lambda p: steps.init_state(p, optimizer)
        state_abs = jax.eval_shape(make, trainable)
        state_sh = sharding.state_shardings(mesh, state_abs, train_specs)
        with_sh = lambda t, s: jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s)
        state_in = with_sh(state_abs, state_sh)
        ref_dt = jnp.dtype(a.ref_dtype) if a.ref_dtype else jnp.float32
        frozen, frozen_named = params, named
        if quantize:  # the base's Linear matrices as NF4 codes and scales, split with them
            flat = models.flatten(params)
            for path in tuning.quantized_paths + tuning.quantized_tables:
                flat[f"{path}.weight"] = quant.abstract(
                    flat[f"{path}.weight"].shape, tuning.cfg.quantize,
                    rows=path in tuning.quantized_tables, nested=tuning.cfg.double_quant)
            frozen = models.unflatten_like(params, flat)
            fspecs = quant.fit_scales(mesh, frozen,
                                      sharding.param_specs(frozen, tuning.base_rules()))
            sharding.check_divisible(mesh, frozen, fspecs)
            frozen_named = sharding.named(mesh, fspecs)
        frozen_in = jax.tree.map(  # codes and scales as they are, the rest in ref_dtype
            lambda x, sh: jax.tree.map(
                lambda y, s: jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=s), x, sh)
            if quant.is_quantized(x) else jax.ShapeDtypeStruct(x.shape, ref_dt, sharding=sh),
            frozen, frozen_named, is_leaf=quant.is_quantized)
        rows_ = 2 * a.pairs
        batch = {k: jax.ShapeDtypeStruct((1, rows_, a.seq), jnp.int32,  # seq: a multiple of context
                                         sharding=sharding.batch_sharding(mesh, 3))
                 for k in ("input_ids", "attention_mask", "loss_mask", "tail_mask")}
        batch["valid"] = jax.ShapeDtypeStruct((1, a.pairs), jnp.float32,
                                              sharding=sharding.batch_sharding(mesh, 2))
        replicated = NamedSharding(mesh, P())
        train_step = steps.make_train_step(tuning, layouts.make("pair"),
                                           LossConfig(), optimizer, lambda s: 1e-6,
                                           chunk_size=a.chunk,
                                           in_shardings=(state_sh, frozen_named,
                                                         {k: v.sharding for k, v
                                                                            in batch.items()}),
                                           out_shardings=(state_sh, replicated))
        compiled = train_step.lower(state_in, frozen_in, batch).compile()
        ma = compiled.memory_analysis()
        ran = run_steps(compiled, (state_in, frozen_in, batch), a) if a.run else ""
        # full tuning: the frozen copy is the reference; LoRA: it is the base, the reference
        # being that same base with the adapters off (no second copy)
        rows.append((remat, rank, quantize, per_device(state_in["params"]),
                     per_device(state_in["opt_state"]), per_device(frozen_in),
                     ma.temp_size_in_bytes, ma.argument_size_in_bytes, ran))

    dev = jax.devices()[0]
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    print(f"{a.model}: {base.n_layers} layers, {n_params / 1e6:.0f}M params; {a.pairs} pairs x "
          f"{a.seq} tokens; "
          f"mesh {dict(mesh.shape)}; {len(mesh.devices.flat)} x {dev.device_kind} ({dev.platform});"
          f" compute {a.dtype}, reference {a.ref_dtype or 'float32'}, LM-head chunk {a.chunk}, "
          f"{a.attention} attention")
    print(f"{'tuning':>13} {'remat':>6} {'trainable':>10} {'opt state':>10} {'frozen':>9} "
          f"{'reference':>10} {'temp (act.)':>12} {'arguments':>10}   MiB per device"
          + (f"   {'peak MiB':>9} {'s / step':>9} {'tokens/s':>9}  (run)" if a.run else ""))
    for remat, rank, quantize, p, o, f, t, args, ran in rows:
        policy = a.remat_policy if remat else "off"
        tuning_name = (f"QLoRA r{rank}{''.join('+' + t for t in quantize.split('+')[1:])}"
                       if quantize else f"LoRA r{rank}") if rank else "full"
        ref = "0 (base)" if rank else f"{mib(f):.1f}"
        print(f"{tuning_name:>13} {policy[:6]:>6} {mib(p):10.1f} {mib(o):10.1f} {mib(f):9.1f} "
              f"{ref:>10} {mib(t):12.1f} {mib(args):10.1f}" + (f"   {ran}" if ran else ""))


def run_steps(compiled, inputs, a) -> str:
    """The compiled step run on zero weights and a random pair batch, placed as ``inputs``
    (ShapeDtypeStructs with shardings) say: one untimed step, then ``a.run`` timed. The row's
    run columns: the device's peak MiB ("-" where it keeps no count, as the CPU), the median
    seconds per step and tokens/s; "OOM" where the device ran out of memory."""
    import statistics
    import time
    import jax
    import jax.numpy as jnp
    import numpy as np
    state_in, frozen_in, batch_in = inputs
    zeros = lambda tree: jax.jit(
        lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree),
        out_shardings=jax.tree.map(lambda s: s.sharding, tree))()
    rng = np.random.default_rng(0)
    shape = batch_in["input_ids"].shape  # (1, rows, seq): each row half prompt, half completion
    host = {"input_ids": rng.integers(0, 256, shape).astype(np.int32),
            "attention_mask": np.ones(shape, np.int32),
            "loss_mask": np.zeros(shape, np.int32), "valid": np.ones((1, a.pairs), np.float32)}
    host["loss_mask"][..., a.seq // 2:] = 1
    host["tail_mask"] = host["loss_mask"]
    batch = {k: jax.device_put(v, batch_in[k].sharding) for k, v in host.items()}
    times = []
    try:
        state, frozen = zeros(state_in), zeros(frozen_in)
        for i in range(a.run + 1):
            t = time.perf_counter()
            state, m = compiled(state, frozen, batch)  # the state is donated
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    except Exception as e:  # the device's out-of-memory error is a runtime one
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return f"{'OOM':>9}"
        raise
    stats = jax.devices()[0].memory_stats() or {}
    peak = f"{stats['peak_bytes_in_use'] / 2**20:9.0f}" if "peak_bytes_in_use" in stats else \
        f"{'-':>9}"
    step = statistics.median(times[1:])
    return f"{peak} {step:9.3f} {2 * a.pairs * a.seq / step:9.0f}"


def run_each_case(n: int):
    """``--run``: this script once per case (``--case i``), each printing its one row; printed
    as one table."""
    import subprocess
    argv = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:]
    header = False
    for i in range(n):
        done = subprocess.run(argv + ["--case", str(i)], capture_output=True, text=True)
        lines = done.stdout.rstrip("\n").splitlines()
        if done.returncode:
            print(f"case {i} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        print("\n".join(lines[2:] if header else lines), flush=True)  # the header once
        header = True


if __name__ == "__main__":
    sys.exit(main())
