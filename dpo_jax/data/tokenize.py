"""Rows -> token ids: validated, normalized, tokenized and truncated, batched and cached.

Two tokenizations (config key ``tokenization``):

- ``"trl"`` (the default), TRL 1.16's ``DPOTrainer`` exactly (trl/trainer/dpo_trainer.py,
  ``_prepare_dataset`` and ``DataCollatorForPreference``): EOS (as text) is appended to a plain
  completion that does not already end with it, and never to a chat row, whose template ends the
  turn; ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are tokenized whole with the
  tokenizer's own special tokens (so a BOS-adding tokenizer puts BOS on the prompt; chat rows go
  through ``apply_chat_template``, which writes its own BOS once), and split at their longest
  common token prefix, so a prompt ending in a space or mid-word gets the tokens of the full text.
  Each sequence keeps its first ``max_length`` tokens; a row whose prompt alone fills
  ``max_length`` is dropped (``prompt_too_long``). ``max_prompt_length`` is not used.
- ``"separate"``, the reference DPO code's (Rafailov et al.): prompt and completions tokenized
  apart without special tokens, EOS appended to a completion that does not end with it (and not
  to chat rows), BOS prepended with ``add_bos``; over ``max_length`` the prompt keeps its last
  ``max_prompt_length`` tokens, then the completions their first tokens that still fit.

In both, ``max_completion_length`` (when set) then caps each completion: the static scoring
window of the completion-only head and prefix sharing.

The work runs in ``datasets.map`` (batched) and is cached next to the data, keyed by the data's
fingerprint, the tokenizer and every setting that changes the tokens (``cache_key``), so a rerun
reads the cache instead of tokenizing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from dpo_jax.data import formats
from dpo_jax.data.sources import DataError, describe_row

# The DataConfig fields that change what tokenization produces (the cache key holds them by name).
TOKEN_FIELDS = ("split", "prompt_column", "chosen_column", "rejected_column", "max_length",
                "max_prompt_length", "max_completion_length", "add_bos", "on_bad_row",
                "tokenization")
TOKENIZATIONS = ("trl", "separate")
CACHE_VERSION = 6  # bump when the rules below change what a setting produces


@dataclasses.dataclass
class TokenizedPairs:
    """Token ids of the kept pairs (one int32 array per pair and part) and the summary counts."""

    prompt: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    stats: dict

    def __len__(self):
        return len(self.prompt)

    def pair_lengths(self) -> np.ndarray:
        """Tokens each pair needs in the two-sequence layout: prompt + the longer completion."""
        return np.array([len(p) + max(len(c), len(r))
                         for p, c, r in zip(self.prompt, self.chosen, self.rejected)], np.int64)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id,
                   getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()[:16]


def cache_key(data_fingerprint: str, tokenizer, cfg) -> str:
    fields = {"data": data_fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer),
              "version": CACHE_VERSION, **{f: getattr(cfg, f) for f in TOKEN_FIELDS}}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def truncate_separate(p: list, c: list, r: list, cfg) -> tuple[list, list, list, bool]:
    """The reference code's rule: over max_length, the prompt keeps its last max_prompt_length
    tokens, then both completions their first tokens that still fit."""
    if len(p) + max(len(c), len(r)) <= cfg.max_length:
        return p, c, r, False
    p = p[-cfg.max_prompt_length:]
    room = cfg.max_length - len(p)
    return p, c[:room], r[:room], True


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def tokenize_trl(examples, tokenizer, cfg):
    """[(prompt, chosen, rejected, truncated)] and a drop reason per example, as TRL 1.16."""
    eos = tokenizer.eos_token
    with_eos = lambda t: t if t.endswith(eos) else t + eos
    texts = [("", "", "") if e.conversational else (e.prompt, with_eos(e.chosen),
                                                     with_eos(e.rejected)) for e in examples]
    enc = lambda xs: tokenizer(xs)["input_ids"]
    p_ids = enc([p for p, _, _ in texts])
    pc_ids = enc([p + c for p, c, _ in texts])
    pr_ids = enc([p + r for p, _, r in texts])
    out, drop = [], []
    for e, p, pc, pr in zip(examples, p_ids, pc_ids, pr_ids):
        if e.conversational:
            pm, cm, rm = e.messages
            p = _chat_ids(tokenizer, pm, add_generation_prompt=True)
            pc, pr = _chat_ids(tokenizer, pm + cm), _chat_ids(tokenizer, pm + rm)
        k = min(common_prefix(p, pc), common_prefix(p, pr))
        p, c, r = p[:k], pc[k:], pr[k:]
        if len(p) >= cfg.max_length:
            out.append(([], [], [], False))
            drop.append("prompt_too_long")
            continue
        room = cfg.max_length - len(p)
        out.append((p, c[:room], r[:room], max(len(c), len(r)) > room))
        drop.append("")
    return out, drop


def tokenize_separate(examples, tokenizer, cfg):
    """[(prompt, chosen, rejected, truncated)] and a drop reason per example, as the reference
    DPO code makes them (with EOS appended once, and not to chat rows)."""
    enc = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"]
    p_ids = enc([e.prompt for e in examples])
    c_ids = enc([e.chosen for e in examples])
    r_ids = enc([e.rejected for e in examples])
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    out = []
    for e, p, c, r in zip(examples, p_ids, c_ids, r_ids):
        if not e.conversational:  # a chat template ends the turn itself
            c, r = (x if x[-1:] == [eos] else x + [eos] for x in (c, r))
        if cfg.add_bos and bos is not None and p[:1] != [bos]:
            p = [bos] + p
        out.append(truncate_separate(p, c, r, cfg))
    return out, [""] * len(examples)


def tokenize_batch(batch, indices, *, cfg, tokenizer, where: str, row_offset: int = 0):
    """datasets.map function: one batch of rows -> token ids, a drop reason per row.
    ``row_offset``: where this share of the rows starts in the source (multi-host shards)."""
    names = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    has_prompt = cfg.prompt_column in batch
    examples, drop = [], []
    for j, row in enumerate(indices):
        p = batch[cfg.prompt_column][j] if has_prompt else None
        try:
            ex = formats.normalize(p, batch[names[1]][j], batch[names[2]][j], names=names,
                                   has_prompt=has_prompt, tokenizer=tokenizer)
            reason = ""
        except formats.BadRow as e:
            if cfg.on_bad_row == "error" or e.fatal:
                raise DataError(f"{where}, {describe_row(where, row + row_offset)}: {e}") from None
            ex, reason = None, "bad_row"
        except formats.Dropped as e:
            ex, reason = None, e.reason
        examples.append(ex or formats.Example("", "", ""))
        drop.append(reason)

    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; completions must end with one")
    tokenize = tokenize_trl if cfg.tokenization == "trl" else tokenize_separate
    rows, reasons = tokenize(examples, tokenizer, cfg)
    p_ids, c_ids, r_ids, truncated = [], [], [], []
    cap = cfg.max_completion_length
    for j, ((p, c, r, cut), reason) in enumerate(zip(rows, reasons)):
        drop[j] = drop[j] or reason
        why = "max_length" if cut else ""  # the setting that cut the row, for the summary
        if cap and max(len(c), len(r)) > cap:  # the static scoring window
            c, r, why = c[:cap], r[:cap], why or "max_completion_length"
        p_ids.append(p)
        c_ids.append(c)
        r_ids.append(r)
        truncated.append("" if drop[j] else why)
    return {"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids,
            "drop": drop, "truncated": truncated}


def tokenize_pairs(ds, tokenizer, cfg, *, where: str | None = None, unparsable_lines: int = 0,
                   row_offset: int = 0) -> TokenizedPairs:
    """Validate, normalize, tokenize and truncate every row (batched, cached), then summarize."""
    where = where or cfg.source
    cols = set(ds.column_names)
    for name in (cfg.chosen_column, cfg.rejected_column):
        if name not in cols:
            raise DataError(f"{where}: no column {name!r}; the data has {sorted(cols)} "
                            f"(set chosen_column / rejected_column / prompt_column)")
    cache_dir = Path(cfg.cache_dir or (os.path.dirname(ds.cache_files[0]["filename"])
                                       if ds.cache_files else
                                       Path.home() / ".cache" / "dpo_jax"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(ds._fingerprint, tokenizer, cfg)
    cache_file = cache_dir / f"dpo_jax-tokenized-{key}.arrow"
    from_cache = cache_file.exists()
    datasets.disable_progress_bars()
    out = ds.map(tokenize_batch, batched=True, batch_size=1000, with_indices=True,
                 fn_kwargs=dict(cfg=cfg, tokenizer=tokenizer, where=where, row_offset=row_offset),
                 remove_columns=ds.column_names, load_from_cache_file=True,
                 cache_file_name=str(cache_file), new_fingerprint=key)
    drop = out["drop"]
    keep = np.array([d == "" for d in drop], bool)
    reasons = Counter(d for d in drop if d)
    if unparsable_lines:  # lines skipped before the dataset could even be formed
        reasons["bad_row"] += unparsable_lines

    def ragged(col):
        arr = out.data.column(col).combine_chunks()
        values = np.asarray(arr.values, np.int32)
        offsets = np.asarray(arr.offsets)
        return [values[offsets[i]:offsets[i + 1]] for i in np.flatnonzero(keep)]

    pairs = TokenizedPairs(ragged("prompt_ids"), ragged("chosen_ids"), ragged("rejected_ids"), {})
    n_tokens = np.array([len(p) + len(c) + len(r)
                         for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected)])
    pairs.stats = {
        "rows_read": len(ds) + unparsable_lines,
        "rows_kept": int(keep.sum()),
        "rows_dropped": dict(sorted(reasons.items())),
        "rows_truncated": sum(bool(t) for t in out["truncated"]),
        "truncated_by": dict(sorted(Counter(t for t in out["truncated"] if t).items())),
        "mean_tokens": float(n_tokens.mean()) if len(n_tokens) else 0.0,
        "max_tokens": int(n_tokens.max()) if len(n_tokens) else 0,
        "from_cache": from_cache,
    }
    if not len(pairs):
        raise DataError(f"{where}: no usable preference pairs (dropped: {dict(reasons)})")
    return pairs


def summary_line(stats: dict, padding_fraction: float | None = None) -> str:
    dropped = ", ".join(f"{k}={v}" for k, v in stats["rows_dropped"].items()) or "none"
    by = ", ".join(f"{v} by config key {k}" for k, v in stats.get("truncated_by", {}).items())
    s = (f"rows read {stats['rows_read']}, kept {stats['rows_kept']}, dropped: {dropped}; "
         f"truncated {stats['rows_truncated']}{f' ({by})' if by else ''}; tokens/pair mean "
         f"{stats['mean_tokens']:.1f} max {stats['max_tokens']}")
    if padding_fraction is not None:
        s += f"; padding {100 * padding_fraction:.1f}%"
    return s
