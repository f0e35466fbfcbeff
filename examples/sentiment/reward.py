"""Reward functions: a list of texts in, a float32 array of rewards out (higher = more positive).

``classifier`` is the offline default: the log-odds of "positive" under a bag-of-words logistic
regression trained, seeded, on the synthetic corpus's labelled reviews (positive 1, negative 0,
mixed 0.5), as the DPO paper's reward is a sentiment classifier's logit margin. It is graded and
does not saturate: every further positive word adds its weight. ``lexicon`` counts positive minus
negative words (a negator just before a word flips it), squashed to (-1, 1): it saturates once a
review has one or two positive words. ``hf_classifier(model)`` is the paper's kind of
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


def _features(text: str) -> list[str]:
    """Lower-cased words; a word right after a negator is read as 'not_<word>'."""
    words = _WORD.findall(text.lower())
    return [("not_" + w if i and words[i - 1] in NEGATORS else w) for i, w in enumerate(words)]


class BagOfWordsClassifier:
    """Logistic regression on word counts, fitted by full-batch gradient descent with an L2
    penalty (deterministic: no randomness beyond the data). ``__call__`` gives the log-odds."""

    def __init__(self, texts: Sequence[str], targets: Sequence[float], l2: float = 1e-3,
                 steps: int = 400, lr: float = 2.0, min_count: int = 2):
        counts: dict[str, int] = {}
        for t in texts:
            for w in _features(t):
                counts[w] = counts.get(w, 0) + 1
        self.vocab = {w: i for i, w in enumerate(sorted(w for w, n in counts.items()
                                                        if n >= min_count))}
        x = self._matrix(texts)
        y = np.asarray(targets, np.float64)
        w, b = np.zeros(x.shape[1]), 0.0
        for _ in range(steps):
            p = 1 / (1 + np.exp(-(x @ w + b)))
            w -= lr * (x.T @ (p - y) / len(y) + l2 * w)
            b -= lr * float(np.mean(p - y))
        self.w, self.b = w, b
        sure = y != 0.5  # training accuracy on the positive and negative reviews
        self.accuracy = float(np.mean(((x @ w + b) > 0)[sure] == (y > 0.5)[sure]))

    def _matrix(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.vocab)))
        for r, t in enumerate(texts):
            for w in _features(t):
                if w in self.vocab:
                    x[r, self.vocab[w]] += 1
        return x

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return (self._matrix(texts) @ self.w + self.b).astype(np.float32)


_CLASSIFIER: BagOfWordsClassifier | None = None


def classifier(texts: Sequence[str]) -> np.ndarray:
    """The log-odds of 'positive' under a classifier trained once per process on 6000 labelled
    synthetic reviews (seed 99, none of them the demo's corpus: that one uses seed 1234)."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from examples.sentiment import corpus
        texts_, kinds = corpus.labelled(6000, seed=99)
        _CLASSIFIER = BagOfWordsClassifier(
            texts_, [{"positive": 1.0, "negative": 0.0, "mixed": 0.5}[k] for k in kinds])
    return _CLASSIFIER(texts)


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


def online_classifier(prompts: Sequence[str], completions: Sequence[str], **_) -> np.ndarray:
    """``classifier`` as on-policy rounds call a reward (dpo_jax/online.py, config key
    ``online_reward="examples.sentiment.reward:online_classifier"``): of prompt + completion."""
    return classifier([p + c for p, c in zip(prompts, completions)])


def online_lexicon(prompts: Sequence[str], completions: Sequence[str], **_) -> np.ndarray:
    """``lexicon`` as on-policy rounds call a reward."""
    return lexicon([p + c for p, c in zip(prompts, completions)])


def load(spec: str) -> Reward:
    """``classifier``, ``lexicon``, ``hf:<model id>``, or ``module:function`` (a Reward, or a
    factory of one when the name ends in ``()``)."""
    if spec == "lexicon":
        return lexicon
    if spec == "classifier":
        return classifier
    if spec.startswith("hf:"):
        return hf_classifier(spec[3:])
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"config key reward={spec!r}: use 'classifier', 'lexicon', "
                         f"'hf:<model id>' or 'module:function'")
    factory = name.endswith("()")
    fn = getattr(importlib.import_module(module), name.removesuffix("()"))
    return fn() if factory else fn
