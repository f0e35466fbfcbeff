"""DPO train-step speed: dpo_jax in each mode against a hand-written PyTorch baseline (issues 7, 15).

    python bench/step_speed.py                 # all modes, GPT-2 small, 4 pairs x (64+64+64)
    python bench/step_speed.py --model smollm2 # the Llama family at SmolLM2-135M's shape
    python bench/step_speed.py --modes plain,torch --steps 10 --layers 2   # quicker look

Workloads (random init, float32, 4 pairs per step, prompt 64 tokens, chosen 64, rejected 64,
beta 0.1, AdamW): --model gpt2, GPT-2 small's shape (12 layers, 12 heads, width 768, vocab 50257)
against transformers' GPT2LMHeadModel; --model smollm2, SmolLM2-135M's (30 layers, width 576,
9 query / 3 KV heads of 64, SwiGLU 1536, vocab 49152, a tied head) against LlamaForCausalLM. Modes:
  plain        two rows per pair, LM head on every position, reference forward in the step
  head         + LM head only where completion tokens are scored
  shared       + prefix sharing: one row prompt + chosen + rejected
  precomputed  + reference log-probs precomputed (no reference forward in the step)
  qlora        plain with --lora-rank on a 4-bit base (quantize_base="nf4": every Linear
               matrix in bitsandbytes' NF4, dequantized per use in the step)
  qlora-dq     qlora with the NF4 scales double quantized (double_quant)
  qlora-int8   qlora on bitsandbytes' row-wise int8 base (quantize_base="int8")
  qlora-fp8    qlora on transformers' fine-grained FP8 base (quantize_base="fp8")
  torch        transformers' model of the same shape, chosen and rejected in one forward,
               reference under no_grad, torch.optim.AdamW, float32
  torch-lora   the peer of LoRA (--lora-rank): PEFT's adapters on the same matrices as ours,
               the reference the same model under ``disable_adapter()`` (TRL's way)
  torch-qlora  torch-lora on a bitsandbytes NF4 base (``BitsAndBytesConfig(load_in_4bit=True,
               bnb_4bit_quant_type="nf4")``, compute in --dtype): the peer of qlora
  torch-qlora-dq  torch-qlora with bnb_4bit_use_double_quant: the peer of qlora-dq
Our modes log TRL's per-token metrics as a run does (token_metrics=True; TRL 1.16's DPOTrainer
computes them in its fused head too); --no-token-metrics skips them, as the torch modes (log-probs
only) do. Each mode runs in its own process (peak RSS is that process's). Step time is the median of
--steps timed steps after 2 warm-up steps. tokens/s counts the tokens of the chosen and the
rejected sequences (prompt + completion each: 4 x 2 x 128 = 1024 per step) in every mode, so the
numbers compare the same work.

FLOPs are analytic (matmuls only): 3x the policy forward (forward + backward) + the reference
forward, each over the rows, positions and LM-head positions that mode really computes. MFU is a
mode's own FLOPs / step time / the matmul peak measured first with XLA on the same machine
(best of 10 square products at a few sizes; the torch child measures torch's own peak the same
way). "ceiling" is the best a mode could do against the baseline if it ran at 100% of XLA's
peak: torch step time / (mode FLOPs / peak). (XLA's cost analysis is not used: it counts the
scanned block once, not n_layer times.)

On a GPU (JAX and torch both see one), both sides run there; --dtype bfloat16 runs the compute in
bf16 (torch: autocast), log-softmax in float32 on both sides, and the peak device memory of each
process is reported too. float32 matmuls run in TF32 on both sides there (XLA's default on a
GPU; torch is told to allow it).
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT, COMPLETION = 64, 64
PAIRS = 4  # --pairs


@dataclasses.dataclass(frozen=True)
class Shape:
    """The matmul shape of a model: what its FLOPs and its JAX / torch twins are built from."""

    family: str        # gpt2 | llama | moe
    layers: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int           # MLP width
    vocab: int
    gated: bool        # SwiGLU (3 MLP matrices) or GELU (2)
    experts: int = 0   # a mixture of experts (Qwen3-MoE's layout): experts per layer,
    top_k: int = 0     # and experts per token (ffn is then each expert's width)


QUANT = {"qlora": "nf4", "qlora-dq": "nf4", "qlora-int8": "int8", "qlora-fp8": "fp8"}  # bases
PEFT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],  # the matrices our family.lora_target names
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"],
                "moe": ["q_proj", "k_proj", "v_proj", "o_proj"]}
SHAPES = {
    "gpt2": Shape("gpt2", 12, 768, 12, 12, 64, 3072, 50257, False),
    "smollm2": Shape("llama", 30, 576, 9, 3, 64, 1536, 49152, True),
    "gpt2-medium": Shape("gpt2", 24, 1024, 16, 16, 64, 4096, 50257, False),
    "qwen3-0.6b": Shape("llama", 28, 1024, 16, 8, 128, 3072, 151936, True),
    # configs/tiny_moe.py's shape, and a small Qwen3-MoE (16 experts, top-4)
    "tiny-moe": Shape("moe", 2, 64, 4, 2, 16, 48, 512, True, experts=4, top_k=2),
    "small-moe": Shape("moe", 8, 512, 8, 4, 64, 256, 32000, True, experts=16, top_k=4),
}
# the vendors' dense bfloat16 peaks (MFU is also reported against these on such a GPU)
NOMINAL_BF16 = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H200": 989.4e12}


def model_flops(m: Shape, rows, seq, head_positions):
    """Analytic FLOPs of one forward over rows x seq tokens (matmuls only, full attention), the
    LM head over ``head_positions`` positions in all."""
    tokens = rows * seq
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    active = max(1, m.top_k)  # the experts a token runs through (+ its router)
    per_layer = 2 * tokens * (m.width * (q + 2 * kv) + q * m.width + m.width * m.experts
                              + active * (3 if m.gated else 2) * m.width * m.ffn)
    attention = 2 * 2 * rows * seq * seq * q
    head = 2 * head_positions * m.width * m.vocab
    return m.layers * (per_layer + attention) + head


def mode_flops(mode, m: Shape, lora: bool = False):
    """FLOPs of one train step in ``mode``: 3x the policy forward (forward, backward to the
    inputs, backward to the weights) + the reference forward. With LoRA the frozen matrices get
    no weight gradient: 2x the policy forward (the adapters' own FLOPs are negligible)."""
    if mode in ("plain", "torch") or mode.startswith(("qlora", "torch-")):  # two rows a pair
        fwd = model_flops(m, 2 * PAIRS, PROMPT + COMPLETION, 2 * PAIRS * (PROMPT + COMPLETION))
    elif mode == "head":  # two rows per pair, head on the completion positions
        fwd = model_flops(m, 2 * PAIRS, PROMPT + COMPLETION, 2 * PAIRS * COMPLETION)
    else:  # one row per pair: prompt + chosen + rejected
        fwd = model_flops(m, PAIRS, PROMPT + 2 * COMPLETION, 2 * PAIRS * COMPLETION)
    policy = 2 if lora and mode != "torch" else 3
    return (policy if mode == "precomputed" else policy + 1) * fwd


def shape_of(a) -> Shape:
    return dataclasses.replace(SHAPES[a.model], layers=a.layers or SHAPES[a.model].layers)


def jax_model(m: Shape, dtype: str, attention: str = "xla"):
    """(module class, config) of our model of this shape."""
    if m.family == "gpt2":
        from dpo_jax.models.gpt2 import GPT2, GPT2Config
        return GPT2, GPT2Config(n_layer=m.layers, n_embd=m.width, n_head=m.heads,
                                vocab_size=m.vocab, remat=False, dtype=dtype,
                                n_positions=max(1024, PROMPT + 2 * COMPLETION),
                                attention=attention)
    if m.family == "moe":
        from dpo_jax.models.moe import MoE, MoEConfig
        return MoE, MoEConfig(vocab_size=m.vocab, hidden_size=m.width,
                              moe_intermediate_size=m.ffn, num_experts=m.experts,
                              num_experts_per_tok=m.top_k, num_hidden_layers=m.layers,
                              num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                              head_dim=m.head_dim, max_position_embeddings=4096, qk_norm=True,
                              dtype=dtype, attention=attention)
    from dpo_jax.models.llama import Llama, LlamaConfig
    return Llama, LlamaConfig(vocab_size=m.vocab, hidden_size=m.width, intermediate_size=m.ffn,
                              num_hidden_layers=m.layers, num_attention_heads=m.heads,
                              num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
                              max_position_embeddings=4096, tie_word_embeddings=True,
                              dtype=dtype, attention=attention)


def torch_model(m: Shape, transformers):
    if m.family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=m.layers, n_embd=m.width, n_head=m.heads,
                                      vocab_size=m.vocab, attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(cfg)
    if m.family == "moe":
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=m.vocab, hidden_size=m.width, moe_intermediate_size=m.ffn,
            num_experts=m.experts, num_experts_per_tok=m.top_k, num_hidden_layers=m.layers,
            num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
            max_position_embeddings=2048, norm_topk_prob=True, attn_implementation="sdpa")
        return transformers.Qwen3MoeForCausalLM(cfg)
    cfg = transformers.LlamaConfig(
        vocab_size=m.vocab, hidden_size=m.width, intermediate_size=m.ffn,
        num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
        head_dim=m.head_dim, max_position_embeddings=2048, tie_word_embeddings=True,
        attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def _best_time(fn, sync, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def _sizes(cpu):
    return (1024, 2048, 4096) if cpu else (4096, 8192)


def matmul_peak(dtype="float32", reps=10):
    """XLA's best matmul FLOP/s on the default device over a few square sizes (best of reps)."""
    import jax
    import jax.numpy as jnp
    best = 0.0
    for n in _sizes(jax.default_backend() == "cpu"):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
        f = jax.jit(lambda x: x @ x)
        out = [f(a)]
        out[-1].block_until_ready()
        t = _best_time(lambda: out.append(f(a)), lambda: out.pop().block_until_ready(), reps)
        best = max(best, 2 * n**3 / t)
    return best


def torch_matmul_peak(torch, device, dtype, reps=10):
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    best = 0.0
    for n in _sizes(device == "cpu"):
        a = torch.randn(n, n, device=device, dtype=dtype)
        a @ a
        sync()
        best = max(best, 2 * n**3 / _best_time(lambda: a @ a, sync, reps))
    return best


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
    from dpo_jax import data, layouts, models, sharding, steps
    from dpo_jax.losses import LossConfig
    from dpo_jax.tuning.full import FullTuning
    from dpo_jax.models import common

    cls, cfg = jax_model(shape_of(a), a.dtype, a.attention)
    graphdef = nnx.graphdef(common.abstract(cls, cfg))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(cls(cfg, rngs=nnx.Rngs(0)),
                                                        nnx.Param)))()
    optimizer = optax.adamw(1e-5)
    mesh = sharding.make_mesh(1, 1, 1)
    family = models.family_of(cfg)
    if a.lora_rank:  # trainable: adapters; frozen: the base, which is the reference
        from dpo_jax.tuning import lora
        tuning = lora.LoRATuning(family, cfg, lora.LoRAConfig(
            a.lora_rank, 2.0 * a.lora_rank, 0.0, family.lora_target,
            QUANT.get(mode, ""), double_quant=mode == "qlora-dq"))
        state, state_sh = sharding.init_state(mesh, jax.jit(tuning.init_adapters(0))(),
                                              optimizer, tuning.rules(family.rules))
        # the base: frozen, and the reference with the adapters off (qlora: in NF4)
        ref = jax.device_put(tuning.quantized(params)) if mode in QUANT else params
    else:
        tuning = FullTuning(graphdef)
        state, state_sh = sharding.init_state(mesh, params, optimizer, family.rules)
        ref = jax.tree.map(lambda x, sh: jax.device_put(x, sh, may_alias=False), params,
                           state_sh["params"])
    del params
    layout = layouts.make("prefix_sharing" if mode in ("shared", "precomputed") else "pair",
                          0 if mode == "plain" or mode in QUANT else COMPLETION)
    pairs_ = synthetic_pairs(cfg.vocab_size)
    max_length = PROMPT + COMPLETION
    batches = data.PairBatches(pairs_, batch_size=PAIRS, max_length=max_length, pad_id=0,
                               layout=layout, seed=0)
    loss_cfg = LossConfig(beta=0.1, token_metrics=not a.no_token_metrics)
    if mode == "precomputed":
        ref_fn = steps.make_ref_logps_fn(tuning, layout, chunk_size=a.chunk)
        c, r = ref_fn(state["params"], ref, batches.collate(np.arange(PAIRS)))
        batches.set_reference(c, r)
        if not a.lora_rank:  # full tuning frees the reference; LoRA's base is the policy's too
            ref = {}
    first = data.stack_batches([next(batches)])
    # as the trainer does: layouts pinned, so the state a step returns is the state it takes
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ref_sh = jax.tree.map(lambda x: x.sharding, ref)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in first.items()}
    train_step = steps.make_train_step(tuning, layout, loss_cfg, optimizer, lambda s: 1e-5,
                                       chunk_size=a.chunk,
                                       in_shardings=(state_sh, ref_sh, batch_sh),
                                       out_shardings=(state_sh, replicated))
    loss_fn = jax.jit(steps.make_loss_fn(tuning, layout, loss_cfg, a.chunk))

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
    out = {"step_s": statistics.median(times), "fwd_s": statistics.median(fwd_times),
           "compilations": train_step._cache_size(), "loss": float(m["loss"])}
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def run_torch(a):
    import copy
    import numpy as np
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    dtype = getattr(torch, a.dtype)
    if device == "cuda":  # float32 matmuls in TF32, as XLA runs them on a GPU by default
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = torch_matmul_peak(torch, device, dtype)
    policy = torch_model(shape_of(a), transformers)
    if a.child != "torch":  # PEFT: adapters on a frozen base, the reference with them off
        policy = peft_model(policy, a, device, torch, transformers)
    policy = policy.to(device).train() if a.child == "torch" else policy.train()
    cfg = policy.config
    for mod in policy.modules():  # DPO trains without dropout
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    if a.child == "torch":
        ref = copy.deepcopy(policy).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        reference = lambda ids, mask: seq_logps(ref, ids, mask)
    else:
        def reference(ids, mask):
            with policy.disable_adapter():
                return seq_logps(policy, ids, mask)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    pairs_ = synthetic_pairs(cfg.vocab_size)

    def make_batch():
        ids = np.stack([np.concatenate([p, c]) for p, c in zip(pairs_.prompt, pairs_.chosen)]
                       + [np.concatenate([p, r]) for p, r in zip(pairs_.prompt, pairs_.rejected)])
        ids = torch.tensor(ids, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids, dtype=torch.float32)
        mask[:, PROMPT:] = 1.0
        return ids, mask

    def seq_logps(model, ids, mask):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16"):
            logits = model(ids).logits
        logits = logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (lp * mask[:, 1:]).sum(-1)

    def train_step(ids, mask):
        logps = seq_logps(policy, ids, mask)
        with torch.no_grad():
            ref_logps = reference(ids, mask)
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
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t)
    with torch.no_grad():
        for i in range(min(a.steps, 5) + 1):
            ids, mask = make_batch()
            t = time.perf_counter()
            seq_logps(policy, ids, mask), reference(ids, mask)
            sync()
            if i >= 1:
                fwd_times.append(time.perf_counter() - t)
    out = {"step_s": statistics.median(times), "fwd_s": statistics.median(fwd_times),
           "compilations": None, "loss": float(loss), "torch_peak": peak}
    if device == "cuda":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peft_model(model, a, device, torch, transformers):
    """``model`` (random init) with PEFT's LoRA adapters of rank ``a.lora_rank`` (alpha 2 x rank,
    as ours) on the matrices ours adapts; torch-qlora*: saved, then loaded back on a
    bitsandbytes NF4 base (the other weights float32, compute in --dtype), as TRL's QLoRA
    recipe loads one."""
    import tempfile
    import peft
    if not a.lora_rank:
        sys.exit(f"mode {a.child}: pass --lora-rank")
    if a.child.startswith("torch-qlora"):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, device_map={"": device},
                quantization_config=transformers.BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=getattr(torch, a.dtype),
                    bnb_4bit_use_double_quant=a.child == "torch-qlora-dq"))
    else:
        model = model.to(device)
    return peft.get_peft_model(model, peft.LoraConfig(
        r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0,
        target_modules=PEFT_TARGETS[shape_of(a).family]))


def child(a):
    out = run_torch(a) if a.child.startswith("torch") else run_jax(a.child, a)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main():
    global PAIRS, PROMPT, COMPLETION
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default="plain,head,shared,precomputed,torch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=0, help="0 = the model's own")
    ap.add_argument("--pairs", type=int, default=PAIRS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=0, help="LM-head chunk; 0 = off")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="> 0: every JAX mode trains LoRA adapters on a frozen base (torch stays "
                         "full fine-tuning)")
    ap.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens per pair")
    ap.add_argument("--completion", type=int, default=COMPLETION,
                    help="tokens of each completion")
    ap.add_argument("--no-token-metrics", action="store_true",
                    help="our modes skip TRL's per-token metrics (entropy, logits/*, "
                         "mean_token_accuracy: a statistics pass over the vocabulary, on by "
                         "default as in TRL's DPOTrainer), which the torch modes never compute")
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn", "splash", "tiled"],
                    help="our attention kernel (cudnn: a GPU, bfloat16)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    PAIRS, PROMPT, COMPLETION = a.pairs, a.prompt, a.completion
    # several processes share one GPU in turn: none may hold 75% of its memory up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if a.child:
        return child(a)
    known = {"plain", "head", "shared", "precomputed", "torch", "torch-lora", "torch-qlora",
             "torch-qlora-dq", *QUANT}
    unknown = [m for m in a.modes.split(",") if m not in known]
    if unknown:
        sys.exit(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if not a.lora_rank and any(m.startswith(("torch-", "qlora")) for m in a.modes.split(",")):
        sys.exit("--modes torch-lora, torch-qlora* and qlora*: pass --lora-rank")
    import platform
    import jax
    peak = matmul_peak(a.dtype)
    device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    m = shape_of(a)
    nominal = NOMINAL_BF16.get(device) if a.dtype == "bfloat16" else None
    if nominal:
        print(f"MFU below is against the measured peak; against {device}'s nominal dense bf16 "
              f"{nominal / 1e12:.0f} TFLOP/s multiply by {peak / nominal:.3f}")
    print(f"machine: {device}; XLA {a.dtype} matmul peak {peak / 1e12:.3f} TFLOP/s; "
          f"{a.model} shape, {m.layers} layers; model FLOPs of the plain step "
          f"{mode_flops('plain', m) / 1e9:.0f} GFLOP")
    results = {}
    for mode in a.modes.split(","):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps),
                            "--model", a.model, "--layers", str(a.layers), "--chunk", str(a.chunk),
                            "--lora-rank", str(a.lora_rank),
                            "--pairs", str(a.pairs), "--dtype", a.dtype,
                            "--prompt", str(a.prompt), "--completion", str(a.completion),
                            "--attention", a.attention]
                           + ["--no-token-metrics"] * a.no_token_metrics,
                           capture_output=True, text=True, env=env)
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{mode}: failed\n{r.stderr[-2000:]}")
            continue
        results[mode] = json.loads(line[0][7:])
        print(f"  {mode}: done", file=sys.stderr)
    peer = "torch" if "torch" in results else next(
        (m for m in results if m.startswith("torch")), "torch")  # the first peer run
    if peer in results:
        print(f"torch {a.dtype} matmul peak, same machine: "
              f"{results[peer]['torch_peak'] / 1e12:.3f} TFLOP/s")
    tokens = 2 * PAIRS * (PROMPT + COMPLETION)
    base = results.get(peer, {}).get("step_s")
    gpu = any("peak_device_mb" in r for r in results.values())
    print(f"\n| mode | step (median) | tokens/s | vs {peer} | GFLOP | MFU | ceiling vs {peer} "
          "| step/forward | compilations | peak RSS |" + (" peak device mem |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for mode, r in results.items():
        flops = mode_flops(mode, m, bool(a.lora_rank))
        vs = f"{base / r['step_s']:.2f}x" if base else "-"
        ceiling = f"{base / (flops / peak):.2f}x" if base else "-"
        comp = r["compilations"] if r["compilations"] is not None else "-"
        mem = f" {r['peak_device_mb']:.0f} MiB |" if "peak_device_mb" in r else (
            " - |" if gpu else "")
        print(f"| {mode} | {1000 * r['step_s']:.1f} ms | {tokens / r['step_s']:.0f} | {vs} | "
              f"{flops / 1e9:.0f} | {100 * flops / r['step_s'] / peak:.0f}% | {ceiling} | "
              f"{r['step_s'] / r['fwd_s']:.2f} | {comp} | {r['peak_rss_mb']:.0f} MB |" + mem)


if __name__ == "__main__":
    main()
