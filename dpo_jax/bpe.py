"""A GPT-2-style byte-level BPE tokenizer trained on the spot, for offline runs and tests.

The real GPT-2 vocabulary lives on the hub (``AutoTokenizer.from_pretrained("gpt2")``); where the
hub is out of reach, this trains the same scheme (byte-level pre-tokenization, BPE merges,
``<|endoftext|>`` as BOS and EOS) on the texts at hand and wraps it as a transformers tokenizer.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 1000, path=None):
    """A ``PreTrainedTokenizerFast`` trained on ``texts``; saved to ``path`` when given."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                 unk_token=EOS)
    if path is not None:
        hf.save_pretrained(str(path))
    return hf
