"""Reward functions: a list of texts in, a float32 array of rewards out (higher = more positive).

``lexicon`` is the offline default: counts of positive minus negative words (a negator just
before a word flips it), squashed to (-1, 1). ``hf_classifier(model)`` is the paper's kind of
reward, a sentiment classifier from the hub (the DPO paper used ``lvwerra/distilbert-imdb``).
Any ``module:function`` with the same signature can be named in the demo's config key
``reward``, e.g. ``my_rewards:toxicity``.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Sequence

import numpy as np

Reward = Callable[[Sequence[str]], np.ndarray]

POSITIVE_WORDS = frozenset("""
wonderful brilliant moving superb delightful gripping beautiful charming excellent touching
clever stunning great fantastic funny fresh lovely powerful loved love best smiling cheered joy
recommend enjoyable good amazing perfect fun
""".split())
NEGATIVE_WORDS = frozenset("""
awful boring dull terrible clumsy tedious weak lifeless painful bland messy dreadful poor
forgettable silly stale ugly flat worst sighed waste cold skip bad hate hated leave
""".split())
NEGATORS = frozenset({"not", "never", "cannot", "no", "n't", "hardly"})
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|n't")


def lexicon_score(text: str) -> float:
    """(pos - neg) / (pos + neg + 1): 0 for no sentiment words, towards +-1 with more."""
    words = _WORD.findall(text.lower())
    pos = neg = 0
    for i, w in enumerate(words):
        sign = (w in POSITIVE_WORDS) - (w in NEGATIVE_WORDS)
        if sign and i and words[i - 1] in NEGATORS:
            sign = -sign
        pos += sign > 0
        neg += sign < 0
    return (pos - neg) / (pos + neg + 1)


def lexicon(texts: Sequence[str]) -> np.ndarray:
    return np.asarray([lexicon_score(t) for t in texts], np.float32)


def hf_classifier(model: str = "lvwerra/distilbert-imdb", positive_label: str = "POSITIVE",
                  batch_size: int = 64) -> Reward:
    """A hub sentiment classifier as a reward: the logit margin of the positive class, as in the
    DPO paper's IMDb experiment. Needs the hub (or the model in the local HF cache) and torch."""
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache
    from transformers import pipeline  # torch-backed; loaded only when asked for

    from dpo_jax.hub import hub_reachable
    local = Path(model).is_dir() or isinstance(try_to_load_from_cache(model, "config.json"), str)
    if not (local or hub_reachable()):
        raise RuntimeError(f"reward classifier {model!r} is not a local folder, is not in the HF "
                           "cache, and the hub cannot be reached (offline). Pass a local folder "
                           "('hf:/path/to/classifier') or another reward (config key reward)")
    try:
        clf = pipeline("sentiment-analysis", model=model, top_k=None, function_to_apply="none")
    except OSError as e:
        raise RuntimeError(f"reward classifier {model!r} could not be loaded (no hub access and "
                           f"not in the HF cache?): {e}") from e

    def reward(texts: Sequence[str]) -> np.ndarray:
        out = []
        for scores in clf(list(texts), batch_size=batch_size, truncation=True):
            by_label = {s["label"].upper(): s["score"] for s in scores}
            pos = by_label[positive_label.upper()]
            out.append(pos - max(v for k, v in by_label.items() if k != positive_label.upper()))
        return np.asarray(out, np.float32)

    return reward


def load(spec: str) -> Reward:
    """``lexicon``, ``hf:<model id>``, or ``module:function`` (a Reward, or a factory of one
    when the name ends in ``()``)."""
    if spec == "lexicon":
        return lexicon
    if spec.startswith("hf:"):
        return hf_classifier(spec[3:])
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"config key reward={spec!r}: use 'lexicon', 'hf:<model id>' or "
                         f"'module:function'")
    factory = name.endswith("()")
    fn = getattr(importlib.import_module(module), name.removesuffix("()"))
    return fn() if factory else fn
