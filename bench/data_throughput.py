"""Tokenization throughput and padding of the preference pipeline (issue 3).

    python bench/data_throughput.py [--rows 20000]

Writes N synthetic preference rows (prompt 10-60 words, completions 5-80 words) as JSONL,
trains a 4k-token byte-level BPE on them, and times dpo_jax.data.load_pairs cold (tokenizing) and
warm (read back from the datasets cache). Then reports the padding fraction of an epoch with
max_length only and with length buckets.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from dpo_jax import data as D
from dpo_jax.bpe import train_byte_level_bpe

WORDS = ("the a film movie plot actor actress scene music score director story was is were "
         "good bad great awful boring brilliant dull moving funny slow long short and but "
         "not very quite truly never always I it this that".split())


def synthetic_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    w = lambda lo, hi: " ".join(rng.choice(WORDS, rng.integers(lo, hi)))
    return [{"prompt": w(10, 60), "chosen": " " + w(5, 80), "rejected": " " + w(5, 80)}
            for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    rows = synthetic_rows(a.rows)
    path = os.path.join(tmp, "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = train_byte_level_bpe((r[k] for r in rows[:2000] for k in r), vocab_size=4000)
    cfg = D.Source(source=path, max_length=512, max_prompt_length=128,
                       cache_dir=os.path.join(tmp, "cache"))
    t0 = time.perf_counter()
    pairs = D.load_pairs(cfg, tok)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    D.load_pairs(cfg, tok)
    warm = time.perf_counter() - t0
    print(D.summary_line(pairs.stats))
    print(f"cold (load + validate + tokenize): {cold:.2f}s = {a.rows / cold:,.0f} rows/s")
    print(f"warm (from the datasets cache):    {warm:.2f}s = {a.rows / warm:,.0f} rows/s")
    for buckets in ((), (64, 128, 192, 256, 384)):
        it = D.PairBatches(pairs, batch_size=8, max_length=512, pad_id=0, buckets=buckets)
        print(f"buckets {buckets or 'none'}: padding {100 * it.padding_fraction():.1f}% of positions")


if __name__ == "__main__":
    main()
