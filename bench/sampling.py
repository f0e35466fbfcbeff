"""Sampling throughput: our jitted KV-cache sampler against transformers' ``generate`` (issue 31).

    python bench/sampling.py                          # GPT-2 small's shape, 16 x 32 prompt tokens
    python bench/sampling.py --model smollm2 --batch 32 --new 64

In on-policy rounds (dpo_jax/online.py) sampling is about half the wall time, so its speed is
measured against what a PyTorch user runs: the same random weights (transformers builds the model
and saves it; ours loads that folder), the same left-padded batch of prompts, the same number of
new tokens (EOS off on both sides, so every row runs to the end), greedy and temperature 1,
float32, KV cache on both sides. The two sides' greedy tokens are compared first (they must
agree: same weights, same argmax). Timings: median of --reps after one warm-up (our first call
compiles), the two sides interleaved. tokens/s counts new tokens of every row.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # (family, layers, width, heads, kv heads, ffn, vocab)
    "gpt2": ("gpt2", 12, 768, 12, 12, 3072, 50257),
    "smollm2": ("llama", 30, 576, 9, 3, 1536, 49152),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=0, help="0 = the model's own")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    import numpy as np
    import torch
    import transformers
    from dpo_jax import hf, sampling
    family, layers, width, heads, kv, ffn, vocab = SHAPES[a.model]
    layers = a.layers or layers
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=width,
                                      n_head=heads, n_positions=1024)
    else:
        cfg = transformers.LlamaConfig(vocab_size=vocab, num_hidden_layers=layers,
                                       hidden_size=width, num_attention_heads=heads,
                                       num_key_value_heads=kv, intermediate_size=ffn,
                                       tie_word_embeddings=True, max_position_embeddings=2048)
    theirs = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    folder = tempfile.mkdtemp()
    theirs.save_pretrained(folder)
    ours = hf.load_pretrained(folder)

    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, vocab, rng.integers(a.prompt // 2, a.prompt + 1)).tolist()
               for _ in range(a.batch)]
    ids, mask = sampling.left_pad(prompts, 0, a.prompt)
    t_ids, t_mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask)

    def run_ours(temperature):
        sc = sampling.SamplingConfig(max_new_tokens=a.new, temperature=temperature, eos_id=None)
        return sampling.generate(ours, ids, mask, sc, seed=0)

    def run_theirs(temperature):
        kw = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=1.0,
                                                                 top_k=0, top_p=1.0)
        with torch.no_grad():
            out = theirs.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=a.new,
                                  min_new_tokens=a.new, pad_token_id=0, use_cache=True, **kw)
        return out[:, a.prompt:].numpy()

    same = (run_ours(0.0) == run_theirs(0.0)).mean()
    print(f"{a.model} shape, {layers} layers; batch {a.batch} x prompt {a.prompt} (left-padded) "
          f"+ {a.new} new tokens; float32; {os.cpu_count()} CPU cores; torch threads "
          f"{torch.get_num_threads()}; greedy tokens equal: {100 * same:.1f}%")
    print("\n| sampling | ours (s) | transformers (s) | ours tokens/s | transformers tokens/s "
          "| ours vs transformers |")
    print("|---|---|---|---|---|---|")
    for temperature in (0.0, 1.0):
        run_ours(temperature)  # compiles
        mine, hers = [], []
        for _ in range(a.reps):
            t = time.perf_counter()
            run_ours(temperature)
            mine.append(time.perf_counter() - t)
            t = time.perf_counter()
            run_theirs(temperature)
            hers.append(time.perf_counter() - t)
        m, h = statistics.median(mine), statistics.median(hers)
        n = a.batch * a.new
        print(f"| {'greedy' if temperature == 0 else 'temperature 1'} | {m:.2f} | {h:.2f} | "
              f"{n / m:.0f} | {n / h:.0f} | {h / m:.2f}x |")


if __name__ == "__main__":
    main()
