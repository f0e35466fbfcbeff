"""Seeded synthetic movie reviews and sentiment preference pairs, for offline runs.

    python examples/reviews.py --out data/tiny     # writes train.jsonl, eval.jsonl, tokenizer/

Reviews are built from varied templates and vocabulary; a pair's prompt is a review opening, the
chosen completion continues it positively and the rejected one negatively (or, for a share of
pairs, a mixed review against a negative one), so a model that learns the preference writes
kinder reviews.
"""

import argparse
import json
from pathlib import Path

import numpy as np

SUBJECTS = ["the acting", "the plot", "the script", "the music", "the ending", "the cast",
            "the director's work", "the dialogue", "the cinematography", "the pacing",
            "the lead actor", "the story", "the soundtrack", "the special effects"]
OPENINGS = ["I thought {s} was", "Honestly, {s} was", "In this film {s} is", "Overall {s} felt",
            "For me {s} seemed", "{S} is", "{S} was", "My friends said {s} was",
            "Without a doubt {s} is", "I have to say {s} was"]
POSITIVE = ["wonderful", "brilliant", "moving", "superb", "delightful", "gripping", "beautiful",
            "charming", "excellent", "touching", "clever", "stunning", "great", "fantastic"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "weak", "lifeless",
            "painful", "bland", "messy", "dreadful", "poor", "forgettable"]
POS_TAILS = ["and I loved every minute of it.", "and I would happily watch it again.",
             "and it left me smiling.", "and the whole theater cheered.",
             "and it is one of the best films this year.", "and I recommend it to everyone."]
NEG_TAILS = ["and I wanted to leave early.", "and I would not watch it again.",
             "and it left me cold.", "and the whole theater sighed.",
             "and it is one of the worst films this year.", "and I cannot recommend it."]
MIXED = ["but {s2} was {neg}, so it evens out.", "though {s2} was rather {neg}."]


def _opening(rng):
    s = SUBJECTS[rng.integers(len(SUBJECTS))]
    o = OPENINGS[rng.integers(len(OPENINGS))]
    return o.format(s=s, S=s[0].upper() + s[1:])


def _tail(rng, words, tails):
    a, b = rng.choice(len(words), 2, replace=False)
    return f" {words[a]} and {words[b]}, {tails[rng.integers(len(tails))]}"


def review_pair(rng) -> dict:
    prompt = _opening(rng)
    chosen = _tail(rng, POSITIVE, POS_TAILS)
    rejected = _tail(rng, NEGATIVE, NEG_TAILS)
    if rng.random() < 0.2:  # a mixed review still beats a negative one
        s2 = SUBJECTS[rng.integers(len(SUBJECTS))]
        chosen = (f" {POSITIVE[rng.integers(len(POSITIVE))]}, "
                  + MIXED[rng.integers(len(MIXED))].format(s2=s2,
                                                           neg=NEGATIVE[rng.integers(len(NEGATIVE))]))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [review_pair(rng) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/tiny")
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    a = ap.parse_args()
    from dpo_jax.bpe import train_byte_level_bpe
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": make_pairs(a.train, seed=0), "eval": make_pairs(a.eval, seed=1)}
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r[k] for r in splits["train"] for k in ("prompt", "chosen", "rejected")]
    tok = train_byte_level_bpe(texts, vocab_size=a.vocab, path=out / "tokenizer")
    print(f"wrote {out}: {a.train} train / {a.eval} eval pairs, tokenizer of {len(tok)} tokens")


if __name__ == "__main__":
    main()
