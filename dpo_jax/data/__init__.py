"""Preference data: HF datasets in, fixed-shape numpy token batches out.

    rows (hub id | .json/.jsonl/.parquet/.csv | save_to_disk folder)   sources.py
      -> normalize to (prompt, chosen, rejected): explicit, implicit, conversational   formats.py
      -> validate (clear errors naming file and row, or skip-and-count)
      -> tokenize + truncate, batched and cached with datasets.map   tokenize.py
      -> PairBatches: deterministic, resumable order; fixed shapes   batches.py (+ layouts.py)

Nothing here touches JAX devices.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from dpo_jax import keys as K
from dpo_jax.errors import ConfigError
from dpo_jax.data.batches import PairBatches, bucket_lengths, stack_batches
from dpo_jax.data.formats import implicit_prompt
from dpo_jax.data.sources import FILE_FORMATS, DataError, load_rows, read_source
from dpo_jax.data.tokenize import (TOKENIZATIONS, TokenizedPairs, summary_line, tokenize_pairs,
                                   tokenizer_fingerprint)

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "DataError", "Source", "FILE_FORMATS", "PairBatches", "TokenizedPairs",
           "bucket_lengths", "implicit_prompt", "load_pairs", "load_rows", "load_splits",
           "stack_batches", "summary_line", "tokenize_pairs", "tokenizer_fingerprint"]

def _buckets(name, v):
    try:
        sizes = [int(x) for x in v]
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name}={v!r}: must be a tuple of lengths") from None
    if any(x <= 1 for x in sizes):
        raise ConfigError(f"config key {name}={tuple(v)!r}: every length must be > 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """data (dpo_jax/data/)"""

    dataset_name: str = K.key("", "hub id, .json/.jsonl/.parquet/.csv file, or save_to_disk "
                              "folder (online rounds: unused, each round's pairs are its data)",
                              K.text, resume=True)
    dataset_train_split: str = K.key("train", "split of a hub / save_to_disk dataset to train "
                                     "on", K.nonempty, resume=True)
    eval_dataset_name: str = K.key("", "\"\" = dataset_name (its dataset_test_split); a file or "
                                   "hub id", K.text)
    dataset_test_split: str = K.key("test", "split to evaluate on; \"\" = no evaluation", K.text)
    prompt_column: str = K.key("prompt", "column of the prompt; absent = implicit (shared "
                               "prefix)", K.nonempty, resume=True)
    chosen_column: str = K.key("chosen", "column of the preferred completion (or full text)",
                               K.nonempty, resume=True)
    rejected_column: str = K.key("rejected", "column of the dispreferred completion (or full "
                                 "text)", K.nonempty, resume=True)
    tokenization: str = K.key("trl", "\"trl\": as TRL 1.16 (joint, EOS if missing, tokenizer's "
                              "BOS); \"separate\": the paper's code (apart, add_bos, prompt cut)",
                              K.one_of(*TOKENIZATIONS), resume=True)
    max_length: int = K.key(512, "tokens of prompt + a completion (trl: each sequence is cut)",
                            K.integer(2), resume=True)
    max_prompt_length: int = K.key(128, "\"separate\" only: a cut prompt keeps its last this-"
                                   "many tokens", K.integer(1), resume=True)
    max_completion_length: int = K.key(0, "> 0: cap completions (the static window of the two "
                                       "savings)", K.integer(0), resume=True)
    add_bos: bool = K.key(False, "\"separate\" only: prepend the tokenizer's BOS to prompts",
                          K.flag, resume=True)
    on_bad_row: str = K.key("error", "bad rows: \"error\" (name file and row) | \"skip\" (drop, "
                            "count)", K.one_of("error", "skip"), resume=True)
    length_buckets: tuple = K.key((), "padded lengths besides max_length, e.g. (128, 256); () "
                                  "= none", _buckets, resume=True)
    data_cache_dir: str = K.key("", "tokenization cache; \"\" = next to the data (~/.cache for "
                                "hub)", K.text)

    def __post_init__(self):
        K.check_fields(self)
        if self.tokenization == "separate" and not self.max_prompt_length < self.max_length:
            raise ConfigError(f"config keys max_prompt_length={self.max_prompt_length} and "
                              f"max_length={self.max_length}: the prompt must leave room "
                              "(tokenization='separate' keeps that many prompt tokens)")
        if self.add_bos and self.tokenization == "trl":
            raise ConfigError("config key add_bos=True applies to tokenization='separate'; with "
                              "'trl', BOS is what the tokenizer itself adds")
        columns = (self.prompt_column, self.chosen_column, self.rejected_column)
        if len(set(columns)) < 3:
            raise ConfigError(f"config keys prompt_column, chosen_column, rejected_column name "
                              f"the same column: {columns}")

    def source(self, source: str, split: str) -> "Source":
        """These settings for reading one source and split."""
        keys = {f.name: getattr(self, f.name) for f in K.fields(self)}
        return Source(**keys, source=source, split=split,
                      cache_dir=self.data_cache_dir or None)


@dataclasses.dataclass(frozen=True)
class Source(DataConfig):
    """What the pipeline reads: one ``source`` (hub id, data file, save_to_disk folder) and
    ``split``, with the data keys; ``cache_dir`` None = next to the data (~/.cache)."""

    dataset_name: str = "-"  # (the run's; a Source reads ``source``)
    source: str = ""
    split: str = DataConfig.dataset_train_split
    cache_dir: str | None = None


def load_pairs(cfg: Source, tokenizer, shard: tuple[int, int] = (0, 1)) -> TokenizedPairs:
    """Rows from ``cfg.source``, tokenized; logs the one-line summary.

    shard=(index, count): only that contiguous share of the rows is read and tokenized (each
    process of a multi-host run takes its own).
    """
    rows = read_source(cfg)
    ds, offset = rows.dataset, 0
    if shard[1] > 1:
        n, (index, count) = len(ds), shard
        offset = index * (n // count) + min(index, n % count)  # datasets' contiguous split
        ds = ds.shard(num_shards=count, index=index, contiguous=True)
    pairs = tokenize_pairs(ds, tokenizer, cfg, unparsable_lines=rows.unparsable_lines,
                           row_offset=offset)
    log.info("%s: %s", cfg.source, summary_line(pairs.stats))
    return pairs


def load_splits(cfg: DataConfig, tokenizer, shard: tuple[int, int] = (0, 1)):
    """(train pairs, eval pairs or None) of a run: this process's share of each split."""
    train = load_pairs(cfg.source(cfg.dataset_name, cfg.dataset_train_split), tokenizer,
                       shard=shard)
    eval_source = cfg.eval_dataset_name or cfg.dataset_name
    same_file = (not cfg.eval_dataset_name
                 and Path(cfg.dataset_name).suffix.lower() in FILE_FORMATS)
    if not cfg.dataset_test_split or same_file:
        log.info("no evaluation data (set eval_dataset_name or dataset_test_split)")
        return train, None
    return train, load_pairs(cfg.source(eval_source, cfg.dataset_test_split), tokenizer,
                             shard=shard)
