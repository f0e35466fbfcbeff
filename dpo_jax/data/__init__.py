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

from dpo_jax import defaults
from dpo_jax.data.batches import PairBatches, bucket_lengths, stack_batches
from dpo_jax.data.formats import implicit_prompt
from dpo_jax.data.sources import FILE_FORMATS, DataError, load_rows, read_source
from dpo_jax.data.tokenize import (TOKENIZATIONS, TokenizedPairs, summary_line, tokenize_pairs,
                                   tokenizer_fingerprint)

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "DataError", "FILE_FORMATS", "PairBatches", "TokenizedPairs",
           "bucket_lengths", "implicit_prompt", "load_pairs", "load_rows", "load_splits",
           "stack_batches", "summary_line", "tokenize_pairs", "tokenizer_fingerprint"]

_D = defaults.config()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline needs: the config keys of the same names (defaults from
    configs/default.py), ``source`` and ``split`` being the dataset and split to read."""

    source: str                                          # hub id, data file, save_to_disk folder
    split: str = _D.dataset_train_split
    prompt_column: str = _D.prompt_column
    chosen_column: str = _D.chosen_column
    rejected_column: str = _D.rejected_column
    max_length: int = _D.max_length
    max_prompt_length: int = _D.max_prompt_length
    max_completion_length: int = _D.max_completion_length
    add_bos: bool = _D.add_bos
    on_bad_row: str = _D.on_bad_row
    tokenization: str = _D.tokenization                  # "trl" | "separate" (tokenize.py)
    cache_dir: str | None = _D.data_cache_dir or None    # None = next to the data (~/.cache)

    def __post_init__(self):
        if self.on_bad_row not in ("error", "skip"):
            raise DataError(f"on_bad_row={self.on_bad_row!r}: valid values are 'error', 'skip'")
        if not 0 < self.max_prompt_length < self.max_length:
            raise DataError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < "
                            f"max_length ({self.max_length})")
        if self.tokenization not in TOKENIZATIONS:
            raise DataError(f"tokenization={self.tokenization!r}: valid values are "
                            f"{', '.join(map(repr, TOKENIZATIONS))}")
        if self.add_bos and self.tokenization == "trl":
            raise DataError("add_bos=True applies to tokenization='separate'; with 'trl', BOS is "
                            "what the tokenizer itself adds")

    @classmethod
    def from_config(cls, config, source: str, split: str) -> "DataConfig":
        """The data settings of a run config (configs/default.py keys) for one source."""
        names = [f.name for f in dataclasses.fields(cls)
                 if f.name not in ("source", "split", "cache_dir")]
        return cls(source=source, split=split, cache_dir=config.data_cache_dir or None,
                   **{n: config[n] for n in names})


def load_pairs(cfg: DataConfig, tokenizer, shard: tuple[int, int] = (0, 1)) -> TokenizedPairs:
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


def load_splits(config, tokenizer, shard: tuple[int, int] = (0, 1)):
    """(train pairs, eval pairs or None) of a run config: this process's share of each split."""
    if not config.dataset_name:
        raise DataError("config key dataset_name is empty: name a data file, folder or hub id")
    train = load_pairs(DataConfig.from_config(config, config.dataset_name,
                                              config.dataset_train_split), tokenizer, shard=shard)
    eval_source = config.eval_dataset_name or config.dataset_name
    same_file = (not config.eval_dataset_name
                 and Path(config.dataset_name).suffix.lower() in FILE_FORMATS)
    if not config.dataset_test_split or same_file:
        log.info("no evaluation data (set eval_dataset_name or dataset_test_split)")
        return train, None
    return train, load_pairs(DataConfig.from_config(config, eval_source,
                                                    config.dataset_test_split),
                             tokenizer, shard=shard)
