"""Seeded synthetic movie reviews: positive, negative and mixed, from varied templates.

The stand-in for IMDb in the offline demo. Every review is one or two sentences built from an
opening ("Honestly, the soundtrack was"), a judgement ("truly gripping and clever"), and a tail
that agrees with it or, in mixed reviews, turns against it. The sentiment words come from the
lexicon in ``reward.py``, so the lexicon reward can read what the model learns to write.
"""

from __future__ import annotations

import numpy as np

SUBJECTS = ["the acting", "the plot", "the script", "the music", "the ending", "the cast",
            "the dialogue", "the camera work", "the pacing", "the lead actor", "the story",
            "the soundtrack", "the effects", "the villain", "the first half", "the humor",
            "the costumes", "the direction", "this movie", "this film", "the sequel"]
OPENINGS = ["I thought {s} was", "Honestly, {s} was", "In the end {s} felt", "Overall {s} was",
            "For me {s} seemed", "{S} is", "{S} was", "My friends said {s} was",
            "I have to say {s} was", "To be fair, {s} was", "Even my kids thought {s} was",
            "From the start {s} was", "Critics say {s} is", "Last night {s} looked"]
ADVERBS = ["", "", "really ", "quite ", "truly ", "so ", "very ", "rather ", "simply "]
POSITIVE = ["wonderful", "brilliant", "moving", "superb", "delightful", "gripping", "beautiful",
            "charming", "excellent", "touching", "clever", "stunning", "great", "fantastic",
            "funny", "fresh", "lovely", "powerful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "weak", "lifeless",
            "painful", "bland", "messy", "dreadful", "poor", "forgettable", "silly", "stale",
            "ugly", "flat"]
POS_TAILS = ["I loved every minute of it.", "I would happily watch it again.",
             "It left me smiling.", "The whole theater cheered.",
             "It is one of the best films this year.", "I recommend it to everyone.",
             "A real joy from start to finish.", "Go and see it."]
NEG_TAILS = ["I wanted to leave early.", "I would not watch it again.", "It left me cold.",
             "The whole theater sighed.", "It is one of the worst films this year.",
             "I cannot recommend it.", "A waste of two hours.", "Skip this one."]
NEUTRAL_TAILS = ["It runs for two hours.", "It opens on Friday.", "I saw it with my brother.",
                 "The theater was half full."]


def _pick(rng, xs):
    return xs[rng.integers(len(xs))]


def _opening(rng):
    s = _pick(rng, SUBJECTS)
    return _pick(rng, OPENINGS).format(s=s, S=s[0].upper() + s[1:])


def _judgement(rng, words):
    a, b = rng.choice(len(words), 2, replace=False)
    if rng.random() < 0.5:
        return f"{_pick(rng, ADVERBS)}{words[a]}"
    return f"{_pick(rng, ADVERBS)}{words[a]} and {words[b]}"


def review(rng, sentiment: str) -> str:
    """One review: sentiment 'positive', 'negative' or 'mixed'."""
    if sentiment == "mixed":
        first, second = (POSITIVE, NEGATIVE) if rng.random() < 0.5 else (NEGATIVE, POSITIVE)
        s2 = _pick(rng, SUBJECTS)
        return (f"{_opening(rng)} {_judgement(rng, first)}, but {s2} was "
                f"{_judgement(rng, second)}.")
    words, tails = (POSITIVE, POS_TAILS) if sentiment == "positive" else (NEGATIVE, NEG_TAILS)
    text = f"{_opening(rng)} {_judgement(rng, words)}."
    r = rng.random()
    if r < 0.6:
        text += " " + _pick(rng, tails)
    elif r < 0.75:
        text += " " + _pick(rng, NEUTRAL_TAILS)
    return text


def labelled(n: int, seed: int, mix=(0.4, 0.4, 0.2)) -> tuple[list[str], list[str]]:
    """n reviews and their kinds, positive / negative / mixed in the proportions ``mix``."""
    rng = np.random.default_rng(seed)
    kinds = [str(k) for k in rng.choice(["positive", "negative", "mixed"], size=n,
                                        p=np.asarray(mix) / sum(mix))]
    return [review(rng, k) for k in kinds], kinds


def reviews(n: int, seed: int, mix=(0.4, 0.4, 0.2)) -> list[str]:
    """n reviews, positive / negative / mixed in the proportions ``mix``."""
    return labelled(n, seed, mix)[0]
