"""Preference data: HF datasets in, fixed-shape numpy token batches out.

    rows (hub id | .json/.jsonl/.parquet/.csv | save_to_disk folder)
      -> normalize to (prompt, chosen, rejected): explicit, implicit shared prefix, conversational
      -> validate (clear errors naming file and row, or skip-and-count)
      -> tokenize + truncate, batched and cached with datasets.map
      -> PairBatches: deterministic, resumable order; fixed shapes (optionally length buckets)

Tokenization follows the reference DPO implementation (Rafailov et al.'s code, also TRL's):
prompt and completions are tokenized separately without special tokens, EOS is appended to each
completion, and BOS is prepended to the prompt only when the tokenizer has one and
``add_bos`` asks. See the README for the truncation rule.

Nothing here touches JAX devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad preference data: the message names the file (or dataset) and the row."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline needs; the trainer fills it from the config keys of the same names."""

    source: str                      # hub id, data file, or save_to_disk folder
    split: str = "train"             # split of a hub dataset / save_to_disk DatasetDict
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_length: int = 512            # tokens of prompt + the longer completion
    max_prompt_length: int = 128     # the prompt keeps its last this-many tokens when cut
    max_completion_length: int = 0   # > 0: completions keep at most this many tokens (TRL)
    add_bos: bool = False            # prepend the tokenizer's BOS to the prompt, if it has one
    on_bad_row: str = "error"        # "error": raise naming file and row; "skip": drop and count
    cache_dir: str | None = None     # tokenized cache; None = next to the data (or ~/.cache)

    def __post_init__(self):
        if self.on_bad_row not in ("error", "skip"):
            raise DataError(f"on_bad_row={self.on_bad_row!r}: valid values are 'error', 'skip'")
        if not 0 < self.max_prompt_length < self.max_length:
            raise DataError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < "
                            f"max_length ({self.max_length})")


# =========================================================================== loading

def _hub_reachable() -> bool:
    from dpo_jax.hf import _hub_reachable as probe
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or probe(constants.ENDPOINT)


def load_rows(cfg: DataConfig):
    """The raw rows as a ``datasets.Dataset``; errors name the file and, where known, the line."""
    import datasets

    path = Path(cfg.source).expanduser()
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"{path}: no split {cfg.split!r}; it has {sorted(ds)}")
            ds = ds[cfg.split]
        return ds
    if path.suffix.lower() in FILE_FORMATS:
        if not path.exists():
            raise DataError(f"{path}: no such data file")
        return _load_file(path, FILE_FORMATS[path.suffix.lower()], cfg)
    if path.exists() or cfg.source.startswith((".", "/", "~")):
        raise DataError(f"{cfg.source}: not a data file (expected one of {sorted(FILE_FORMATS)}) "
                        "nor a save_to_disk folder")
    if not _hub_reachable():
        raise DataError(f"{cfg.source!r} is not a local file or folder and the Hugging Face Hub "
                        "cannot be reached (offline). Pass a .json/.jsonl/.parquet/.csv file or a "
                        "save_to_disk folder instead")
    try:
        return datasets.load_dataset(cfg.source, split=cfg.split)
    except Exception as e:
        raise DataError(f"could not load hub dataset {cfg.source!r} split {cfg.split!r}: "
                        f"{type(e).__name__}: {e}") from None


def _first_non_utf8(path: Path) -> str | None:
    """Where a text file stops being UTF-8 (arrow does not check; it fails later, far away)."""
    import codecs
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[: max(e.start, 0)].count(b"\n")
                return f"line {line}: bytes that are not UTF-8 ({e.reason} near byte {offset + e.start})"
            offset += len(chunk)
            line += chunk.count(b"\n")
    return None


def _load_file(path: Path, fmt: str, cfg: DataConfig):
    import datasets
    is_jsonl = fmt == "json" and path.suffix.lower() == ".jsonl"
    if fmt in ("json", "csv") and (problem := _first_non_utf8(path)):
        if cfg.on_bad_row == "skip" and is_jsonl:
            return _load_jsonl_skipping(path)
        raise DataError(f"{path}: {problem}")
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:
        # datasets' errors come from deep inside arrow; find and name the offending line ourselves.
        problem = _diagnose_text_file(path, fmt)
        if problem is None:
            raise DataError(f"{path}: could not be read as {fmt}: {type(e).__name__}: {e}") from None
        if cfg.on_bad_row == "skip" and is_jsonl:
            return _load_jsonl_skipping(path)
        raise DataError(f"{path}: {problem}") from None


def _diagnose_text_file(path: Path, fmt: str) -> str | None:
    """The first unparsable line of a JSON(L) file, described; None if none found."""
    if fmt != "json":
        return None
    text = path.read_text(encoding="utf-8")  # UTF-8 was checked before loading
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON document
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})"
        return None
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {i}: malformed JSON line ({e.msg}, column {e.colno})"
            if not isinstance(row, dict):
                return f"line {i}: expected a JSON object, got {type(row).__name__}"
    # Parsable but inconsistent types across rows (e.g. a number in a text column):
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for key in {k for r in rows for k in r}:
        kinds = {}
        for i, r in enumerate(rows):
            v = r.get(key)
            if v is not None:
                kinds.setdefault(type(v).__name__, i)
        if len(kinds) > 1:
            (k1, i1), (k2, i2) = sorted(kinds.items(), key=lambda kv: kv[1])[:2]
            return (f"row {i2}: column {key!r} holds a {k2} where earlier rows hold {k1} "
                    f"(first at row {i1})")
    return None


def _load_jsonl_skipping(path: Path):
    """Skip mode for a JSONL file datasets cannot read: keep the lines that parse, count the rest."""
    import datasets
    rows, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError
                rows.append(row)
            except (UnicodeDecodeError, ValueError):
                bad += bool(raw.strip())
    # Mixed types across rows cannot form an arrow column: keep them as JSON-encoded objects and
    # let row validation sort them out.
    keys = sorted({k for r in rows for k in r})
    cols = {k: [r.get(k) for r in rows] for k in keys}
    try:
        ds = datasets.Dataset.from_dict(cols)
    except Exception:
        ds = datasets.Dataset.from_dict({k: [json.dumps(v) if not isinstance(v, str) and v is not None
                                             else v for v in vs] for k, vs in cols.items()})
    ds.info.description = json.dumps({"unparsable_lines": bad})
    return ds


# =========================================================================== normalizing

def _is_conversation(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                       for m in v) and len(v) > 0


def _text_error(name: str, v) -> str | None:
    if v is None:
        return f"column {name!r} is null"
    if isinstance(v, str):
        return f"column {name!r} is an empty string" if v == "" else None
    if isinstance(v, list):
        return None if _is_conversation(v) else (
            f"column {name!r} is a list but not a conversation of {{role, content}} messages")
    return f"column {name!r} holds a {type(v).__name__} ({v!r:.40}) where text is expected"


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two full texts that share a prefix (Anthropic HH style) into prompt + completions.

    The prompt is their longest common prefix, cut back to the end of the last whole word, and the
    whitespace before the first differing word goes to the completions: GPT-2's BPE attaches the
    leading space to a word (" Sure"), so this tokenizes as the full text would.
    """
    k = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        k += 1
    mid_word = k > 0 and not chosen[k - 1].isspace() and any(
        k < len(s) and not s[k].isspace() for s in (chosen, rejected))
    if mid_word:
        while k > 0 and not chosen[k - 1].isspace():
            k -= 1
    while k > 0 and chosen[k - 1].isspace():
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def _render_conversation(tokenizer, prompt_msgs, chosen_msgs, rejected_msgs, where):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: conversational rows need a tokenizer with a chat template, "
                        "and this tokenizer has none (set tokenizer.chat_template, or give plain "
                        "text columns)")
    if not prompt_msgs:  # implicit: the shared leading messages are the prompt
        n = 0
        while (n < min(len(chosen_msgs), len(rejected_msgs)) - 1
               and chosen_msgs[n] == rejected_msgs[n]):
            n += 1
        prompt_msgs, chosen_msgs, rejected_msgs = chosen_msgs[:n], chosen_msgs[n:], rejected_msgs[n:]
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    out = [prompt]
    for msgs in (chosen_msgs, rejected_msgs):
        full = tokenizer.apply_chat_template(prompt_msgs + msgs, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render the conversation as the "
                            "prompt followed by the reply; cannot split it")
        out.append(full[len(prompt):])
    return tuple(out)


# =========================================================================== tokenizing

@dataclasses.dataclass
class TokenizedPairs:
    """Token ids of the kept pairs (one int32 array per pair and part) and the summary counts."""

    prompt: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    stats: dict
    # Reference log-probs, (N,) each, once precomputed; batches then carry them.
    ref_chosen: np.ndarray | None = None
    ref_rejected: np.ndarray | None = None

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


TOKENIZE_CALLS = Counter()  # rows tokenized in this process (tests check the cache with it)


def _process_batch(batch, indices, *, cfg: DataConfig, tokenizer, where: str):
    cols = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    has_prompt = cfg.prompt_column in batch
    n = len(indices)
    prompts, chosens, rejecteds, drop = [], [], [], []
    for j in range(n):
        row = indices[j]
        p = batch[cfg.prompt_column][j] if has_prompt else None
        c, r = batch[cfg.chosen_column][j], batch[cfg.rejected_column][j]
        reason = None
        for name, v in zip(cols, (p, c, r)):
            if name == cfg.prompt_column and not has_prompt:
                continue
            err = _text_error(name, v)
            if err:
                if cfg.on_bad_row == "error":
                    raise DataError(f"{where}, row {row}: {err}")
                reason = "bad_row"
                break
        if reason is None:
            if _is_conversation(c) or _is_conversation(r):
                if not (_is_conversation(c) and _is_conversation(r)):
                    msg = "chosen and rejected must both be conversations or both be text"
                    if cfg.on_bad_row == "error":
                        raise DataError(f"{where}, row {row}: {msg}")
                    reason = "bad_row"
                else:
                    pm = p if has_prompt else None
                    if pm is not None and not _is_conversation(pm):
                        pm = [{"role": "user", "content": pm}]
                    p, c, r = _render_conversation(tokenizer, pm, c, r, f"{where}, row {row}")
            elif not has_prompt:
                p, c, r = implicit_prompt(c, r)
                if not p:
                    reason = "no_common_prompt"
        if reason is None and (not c or not r):
            reason = "empty_completion"
        if reason is None and c == r:
            reason = "identical_completions"
        drop.append(reason or "")
        prompts.append(p if reason is None else "")
        chosens.append(c if reason is None else "")
        rejecteds.append(r if reason is None else "")

    TOKENIZE_CALLS["rows"] += n
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    p_ids, c_ids, r_ids = enc(prompts), enc(chosens), enc(rejecteds)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; completions must end with one")
    truncated = []
    for j in range(n):
        p, c, r = p_ids[j], c_ids[j] + [eos], r_ids[j] + [eos]
        if cfg.add_bos and bos is not None:
            p = [bos] + p
        t = False
        if len(p) + max(len(c), len(r)) > cfg.max_length:
            t = True
            p = p[-cfg.max_prompt_length:]
            room = cfg.max_length - len(p)
            c, r = c[:room], r[:room]
        if cfg.max_completion_length and max(len(c), len(r)) > cfg.max_completion_length:
            t = True
            c, r = c[:cfg.max_completion_length], r[:cfg.max_completion_length]
        p_ids[j], c_ids[j], r_ids[j] = p, c, r
        truncated.append(t and not drop[j])
    return {"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids,
            "drop": drop, "truncated": truncated}


def tokenize_pairs(ds, tokenizer, cfg: DataConfig, *, where: str | None = None) -> TokenizedPairs:
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
    key = hashlib.sha256(repr((ds._fingerprint, tokenizer_fingerprint(tokenizer),
                               dataclasses.astuple(cfg)[1:-1], 2)).encode()).hexdigest()[:20]
    import datasets
    datasets.disable_progress_bars()
    out = ds.map(_process_batch, batched=True, batch_size=1000, with_indices=True,
                 fn_kwargs=dict(cfg=cfg, tokenizer=tokenizer, where=where),
                 remove_columns=ds.column_names, load_from_cache_file=True,
                 cache_file_name=str(cache_dir / f"dpo_jax-tokenized-{key}.arrow"),
                 new_fingerprint=key)
    drop = out["drop"]
    keep = np.array([d == "" for d in drop], bool)
    reasons = Counter(d for d in drop if d)
    try:  # lines skipped before the dataset could even be formed
        unparsable = json.loads(ds.info.description or "{}").get("unparsable_lines", 0)
    except (json.JSONDecodeError, AttributeError):
        unparsable = 0
    if unparsable:
        reasons["bad_row"] += unparsable

    def ragged(col):
        arr = out.data.column(col).combine_chunks()
        values = np.asarray(arr.values, np.int32)
        offsets = np.asarray(arr.offsets)
        return [values[offsets[i]:offsets[i + 1]] for i in np.flatnonzero(keep)]

    pairs = TokenizedPairs(ragged("prompt_ids"), ragged("chosen_ids"), ragged("rejected_ids"), {})
    n_tokens = np.array([len(p) + len(c) + len(r)
                         for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected)])
    pairs.stats = {
        "rows_read": len(ds) + unparsable,
        "rows_kept": int(keep.sum()),
        "rows_dropped": dict(sorted(reasons.items())),
        "rows_truncated": int(np.asarray(out["truncated"], bool).sum()),
        "mean_tokens": float(n_tokens.mean()) if len(n_tokens) else 0.0,
        "max_tokens": int(n_tokens.max()) if len(n_tokens) else 0,
    }
    if not len(pairs):
        raise DataError(f"{where}: no usable preference pairs (dropped: {dict(reasons)})")
    return pairs


def load_pairs(cfg: DataConfig, tokenizer, shard: tuple[int, int] = (0, 1)) -> TokenizedPairs:
    """Rows from ``cfg.source``, tokenized; logs the one-line summary.

    shard=(index, count): only that contiguous share of the rows is read and tokenized (each
    process of a multi-host run takes its own).
    """
    rows = load_rows(cfg)
    if shard[1] > 1:
        rows = rows.shard(num_shards=shard[1], index=shard[0], contiguous=True)
    pairs = tokenize_pairs(rows, tokenizer, cfg)
    log.info("%s: %s", cfg.source, summary_line(pairs.stats))
    return pairs


# =========================================================================== batching

def bucket_lengths(max_length: int, buckets=()) -> tuple[int, ...]:
    """The padded lengths batches may have: the given buckets (each <= max_length) + max_length."""
    bs = sorted({int(b) for b in buckets} | {max_length})
    if bs[0] <= 1 or bs[-1] > max_length:
        raise DataError(f"length_buckets {tuple(buckets)} must lie in (1, max_length={max_length}]")
    return tuple(bs)


LAYOUTS = ("pair", "prefix_sharing")
# batch keys whose second axis is the sequence (padded when micro-batches differ in length)
SEQUENCE_KEYS = ("input_ids", "attention_mask", "loss_mask", "position_ids", "segment_ids")


class PairBatches:
    """Fixed-shape batches of preference pairs in a deterministic, resumable order.

    Each batch is a dict of numpy arrays; ``valid`` (B,) is 1 for real pairs, 0 for the padding
    pairs that fill an eval batch. Two layouts:

    - ``pair``: chosen rows first, then rejected rows, so one forward call scores both:
      ``input_ids``, ``attention_mask``, ``loss_mask`` are (2B, L), rows [0, B) the chosen
      sequences (prompt + chosen, right-padded), rows [B, 2B) the rejected ones.
    - ``prefix_sharing``: one (B, L) row per pair, prompt + chosen + rejected, with
      ``position_ids`` and ``segment_ids`` for the attention mask (see ``_collate_shared``).

    With a ``completion_window`` W (max_completion_length), batches also carry ``score_pos``,
    ``score_label``, ``score_mask`` of shape (rows, k, W): for each of the k completions of a row,
    the positions whose hidden state scores its tokens, so the LM head runs only there.
    L is ``max_length``, or with length buckets the smallest bucket that fits every pair of the
    batch (pairs are grouped by bucket, so there are at most len(buckets) shapes).

    Order: epoch e is a permutation drawn from (seed, e); training iterates epochs forever and drops
    each epoch's incomplete batches (a new permutation every epoch). The cursor (epoch, batch index
    within the epoch) is ``state()``; ``PairBatches(..., state=s)`` resumes exactly there.
    """

    def __init__(self, pairs: TokenizedPairs, *, batch_size: int, max_length: int, pad_id: int,
                 seed: int = 0, shuffle: bool = True, buckets=(), state: dict | None = None,
                 layout: str = "pair", completion_window: int = 0):
        if layout not in LAYOUTS:
            raise DataError(f"layout={layout!r}: valid layouts are {', '.join(LAYOUTS)}")
        if layout == "prefix_sharing" and completion_window <= 0:
            raise DataError("prefix_sharing needs max_completion_length > 0 (the static window "
                            "each completion is scored in)")
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.layout, self.window = layout, completion_window
        longest = max(max(len(c), len(r)) for c, r in zip(pairs.chosen, pairs.rejected))
        if completion_window and longest > completion_window:
            raise DataError(f"a completion has {longest} tokens > the scoring window "
                            f"{completion_window} (max_completion_length)")
        if layout == "prefix_sharing":
            # one row per pair: prompt + chosen + rejected <= max_length + the window
            max_length = max_length + completion_window
            self.lengths = np.array([len(p) + len(c) + len(r) for p, c, r in
                                     zip(pairs.prompt, pairs.chosen, pairs.rejected)], np.int64)
        else:
            self.lengths = pairs.pair_lengths()
        self.buckets = bucket_lengths(max_length, buckets)
        if self.lengths.max() > max_length:
            raise DataError(f"a pair needs {self.lengths.max()} tokens > max_length={max_length}")
        self.bucket_of = np.searchsorted(self.buckets, self.lengths)
        self.epoch, self.index = 0, 0
        self._plan_epoch = None
        if state is not None:
            self.restore(state)
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(pairs)} pairs make no full batch of {batch_size}")

    # ---- order
    def _plan(self, epoch: int, *, drop_remainder: bool = True,
              shuffle: bool | None = None) -> list[np.ndarray]:
        """The batches (arrays of pair indices) of one epoch, in order."""
        shuffle = self.shuffle if shuffle is None else shuffle
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)) if shuffle else np.arange(len(self.lengths))
        batches = []
        for b in range(len(self.buckets)):
            rows = order[self.bucket_of[order] == b]
            n_full = len(rows) // self.batch_size
            batches += [rows[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n_full)]
            if not drop_remainder and len(rows) % self.batch_size:
                batches.append(rows[n_full * self.batch_size:])
        if shuffle and len(self.buckets) > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    @property
    def steps_per_epoch(self) -> int:
        return len(self._plan(0))

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed)}

    def restore(self, state: dict):
        if int(state["seed"]) != self.seed:
            raise DataError(f"data cursor was saved with seed {state['seed']}, this run has "
                            f"seed {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._plan_epoch = None

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._plan_epoch is None or self._plan_epoch[0] != self.epoch:
            self._plan_epoch = (self.epoch, self._plan(self.epoch))
        plan = self._plan_epoch[1]
        rows = plan[self.index]
        self.index += 1
        if self.index == len(plan):
            self.epoch, self.index = self.epoch + 1, 0
        return self.collate(rows)

    def eval_batches(self) -> Iterator[dict]:
        """Every pair once, in order; the last batch of each bucket padded with invalid pairs."""
        for _, batch in self.eval_batches_with_rows():
            yield batch

    def eval_batches_with_rows(self) -> Iterator[tuple[np.ndarray, dict]]:
        """As ``eval_batches``, with the pair indices of each batch's valid rows."""
        for rows in self._plan(0, drop_remainder=False, shuffle=False):
            yield rows, self.collate(rows)

    # ---- shapes
    def collate(self, rows: np.ndarray) -> dict:
        if self.layout == "prefix_sharing":
            batch = self._collate_shared(rows)
        else:
            batch = self._collate_pair(rows)
        b = self.batch_size
        valid = np.zeros((b,), np.float32)
        valid[:len(rows)] = 1
        batch["valid"] = valid
        if self.pairs.ref_chosen is not None:
            for key, values in (("ref_chosen_logps", self.pairs.ref_chosen),
                                ("ref_rejected_logps", self.pairs.ref_rejected)):
                batch[key] = np.zeros((b,), np.float32)
                batch[key][:len(rows)] = values[rows]
        return batch

    def _length(self, rows) -> int:
        return self.buckets[int(self.bucket_of[rows].max())]

    def _score_arrays(self, n_rows: int, k: int):
        w = self.window
        return (np.zeros((n_rows, k, w), np.int32), np.zeros((n_rows, k, w), np.int32),
                np.zeros((n_rows, k, w), np.int32))

    def _collate_pair(self, rows) -> dict:
        """Two rows per pair, [prompt | completion | pad]: chosen rows first, then rejected."""
        b, length = self.batch_size, self._length(rows)
        ids = np.full((2 * b, length), self.pad_id, np.int32)
        attn = np.zeros((2 * b, length), np.int32)
        loss = np.zeros((2 * b, length), np.int32)
        if self.window:
            pos, label, mask = self._score_arrays(2 * b, 1)
        for i, r in enumerate(rows):
            p = self.pairs.prompt[r]
            for j, comp in ((i, self.pairs.chosen[r]), (b + i, self.pairs.rejected[r])):
                n = len(p) + len(comp)
                ids[j, :len(p)] = p
                ids[j, len(p):n] = comp
                attn[j, :n] = 1
                loss[j, len(p):n] = 1
                if self.window:  # completion token t is scored by the hidden state at t - 1
                    pos[j, 0, :len(comp)] = np.arange(len(p) - 1, n - 1)
                    label[j, 0, :len(comp)] = comp
                    mask[j, 0, :len(comp)] = 1
        batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
        if self.window:
            batch.update(score_pos=pos, score_label=label, score_mask=mask)
        return batch

    def _collate_shared(self, rows) -> dict:
        """One row per pair, [prompt | chosen | rejected | pad]. The rejected tokens continue the
        prompt's positions and (by segment ids: 0 prompt, 1 chosen, 2 rejected, -1 pad) do not
        see the chosen ones; its first token is scored from the prompt's last position."""
        b, length = self.batch_size, self._length(rows)
        ids = np.full((b, length), self.pad_id, np.int32)
        attn = np.zeros((b, length), np.int32)
        positions = np.zeros((b, length), np.int32)
        segments = np.full((b, length), -1, np.int32)
        pos, label, mask = self._score_arrays(b, 2)
        for i, r in enumerate(rows):
            p, c, rj = self.pairs.prompt[r], self.pairs.chosen[r], self.pairs.rejected[r]
            lp, lc, lr = len(p), len(c), len(rj)
            ids[i, :lp + lc + lr] = np.concatenate([p, c, rj])
            attn[i, :lp + lc + lr] = 1
            positions[i, :lp + lc] = np.arange(lp + lc)
            positions[i, lp + lc:lp + lc + lr] = np.arange(lp, lp + lr)
            segments[i, :lp], segments[i, lp:lp + lc], segments[i, lp + lc:lp + lc + lr] = 0, 1, 2
            pos[i, 0, :lc] = np.arange(lp - 1, lp + lc - 1)
            pos[i, 1, :lr] = np.concatenate([[lp - 1], np.arange(lp + lc, lp + lc + lr - 1)])
            label[i, 0, :lc], label[i, 1, :lr] = c, rj
            mask[i, 0, :lc], mask[i, 1, :lr] = 1, 1
        return {"input_ids": ids, "attention_mask": attn, "position_ids": positions,
                "segment_ids": segments, "score_pos": pos, "score_label": label,
                "score_mask": mask}

    def padding_fraction(self) -> float:
        """Share of token positions in one epoch's batches that are padding."""
        real = total = 0
        shared = self.layout == "prefix_sharing"
        for rows in self._plan(0):
            total += (1 if shared else 2) * self.batch_size * self._length(rows)
            real += sum((1 if shared else 2) * len(self.pairs.prompt[r]) + len(self.pairs.chosen[r])
                        + len(self.pairs.rejected[r]) for r in rows)
        return 1.0 - real / max(total, 1)


def stack_batches(batches: list[dict]) -> dict:
    """Micro-batches stacked on a new leading axis (gradient accumulation), right-padded to the
    longest of them when length buckets gave them different lengths."""
    length = max(b["input_ids"].shape[1] for b in batches)
    fills = {"input_ids": batches[0]["input_ids"][0, -1], "segment_ids": -1}

    def pad(key, a):
        if key not in SEQUENCE_KEYS or a.shape[1] == length:
            return a
        return np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=fills.get(key, 0))

    return {k: np.stack([pad(k, b[k]) for b in batches]) for k in batches[0]}


def summary_line(stats: dict, padding_fraction: float | None = None) -> str:
    dropped = ", ".join(f"{k}={v}" for k, v in stats["rows_dropped"].items()) or "none"
    s = (f"rows read {stats['rows_read']}, kept {stats['rows_kept']}, dropped: {dropped}; "
         f"truncated {stats['rows_truncated']}; tokens/pair mean {stats['mean_tokens']:.1f} "
         f"max {stats['max_tokens']}")
    if padding_fraction is not None:
        s += f"; padding {100 * padding_fraction:.1f}%"
    return s
