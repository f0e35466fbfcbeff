"""Issue 13: tokenization="trl" gives TRL 1.16's token ids, completion masks and truncation, row by
row, compared against TRL itself (its dataset preparation and its collator), on tokenizers
built offline: GPT-2-style BPE, one that adds BOS, and Qwen- and Llama-3-style chat templates.
"""

import json
import types

import numpy as np
import pytest

trl = pytest.importorskip("trl", reason="trl is the reference of these tests")
import datasets  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402

from dpo_jax import data as D  # noqa: E402
from tokenizers_offline import gemma_like, gpt2_like, llama3_like, llama_like, phi3_like, qwen_like  # noqa: E402,E501

MAX_LENGTH = 24


def text_rows(eos: str):
    long_prompt = " ".join(["the film was good"] * 12)
    return [
        {"prompt": "The film was", "chosen": " good and fun.", "rejected": " bad."},
        {"prompt": "The film was ", "chosen": "good and fun.", "rejected": "bad."},  # trailing space
        {"prompt": "The fi", "chosen": "lm was good", "rejected": "lm was bad"},     # mid-word
        {"prompt": "The plot was", "chosen": " dull" + eos, "rejected": " slow"},   # EOS present
        {"prompt": long_prompt, "chosen": " yes", "rejected": " no"},               # prompt fills
        {"prompt": "Is Alien good?", "chosen": " Yes, very." * 8, "rejected": " No."},  # long
    ]


def chat_rows():
    user = [{"role": "user", "content": "Is Alien good?"}]
    yes, no = [{"role": "assistant", "content": "Yes, very."}], [{"role": "assistant",
                                                                  "content": "No idea."}]
    long_yes = [{"role": "assistant", "content": "Yes, very. " * 12}]
    return [{"prompt": user, "chosen": yes, "rejected": no},                 # explicit prompt
            {"prompt": user, "chosen": long_yes, "rejected": no}], \
           [{"chosen": user + yes, "rejected": user + no}]                   # implicit prompt


def trl_rows(tok, rows, max_length):
    """TRL 1.16's (prompt_ids, chosen_ids, rejected_ids) and its collated, truncated rows."""
    args = trl.DPOConfig(output_dir="/tmp/dpo_jax_trl", max_length=max_length, report_to=[],
                         use_cpu=True, bf16=False)
    ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok),
                                     datasets.Dataset.from_list(rows), tok, args, "train")
    examples = [dict(r) for r in ds]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id or 0,
                                      max_length=max_length)(examples)
    seqs = [(ids[m.bool()].tolist(), c[m.bool()].tolist()) for ids, m, c in
            zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]
    return examples, seqs


def our_rows(tok, rows, tmp_path, name, max_length):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = D.Source(source=str(path), cache_dir=str(tmp_path / "cache"),
                       max_length=max_length, max_prompt_length=8, tokenization="trl")
    pairs = D.load_pairs(cfg, tok)
    b = D.PairBatches(pairs, batch_size=len(pairs), max_length=max_length,
                      pad_id=tok.pad_token_id or 0, shuffle=False)
    batch = b.collate(np.arange(len(pairs)))
    seqs = [(ids[m == 1].tolist(), lm[m == 1].tolist()) for ids, m, lm in
            zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])]
    return pairs, seqs


def assert_same(tok, rows, tmp_path, name, max_length=MAX_LENGTH):
    examples, theirs = trl_rows(tok, rows, max_length)
    pairs, ours = our_rows(tok, rows, tmp_path, name, max_length)
    assert len(pairs) == len(examples)  # the same rows dropped (a prompt that fills max_length)
    for i, ex in enumerate(examples):
        assert pairs.prompt[i].tolist() == ex["prompt_ids"], (name, i)
    assert ours == theirs, name  # ids, completion masks and truncation, every row
    return pairs


@pytest.mark.parametrize("make", [gpt2_like, llama_like], ids=["gpt2-bpe", "adds-bos"])
def test_text_rows_tokenize_as_trl_does(make, tmp_path):
    tok = make()
    pairs = assert_same(tok, text_rows(tok.eos_token), tmp_path, make.__name__)
    assert pairs.stats["rows_dropped"] == {"prompt_too_long": 1}
    eos = tok.eos_token_id
    assert pairs.chosen[2].tolist()[-1] == eos and pairs.chosen[2].tolist().count(eos) == 1  # once
    if make is llama_like:
        assert pairs.prompt[0][0] == tok.bos_token_id  # BOS as the tokenizer adds it
    assert tok.decode(pairs.chosen[1][:1]).startswith(" good")  # the space went to " good"


END_OF_TURN = {"qwen_like": "<|im_end|>", "llama3_like": "<|eot_id|>",
               "gemma_like": "<end_of_turn>", "phi3_like": "<|end|>"}
TEMPLATE_BOS = {"llama3_like", "gemma_like"}  # the template writes BOS
CHATS = [qwen_like, llama3_like, gemma_like, phi3_like]
CHAT_IDS = ["chatml", "llama3", "gemma", "phi3"]


@pytest.mark.parametrize("make", CHATS, ids=CHAT_IDS)
def test_chat_rows_tokenize_as_trl_does(make, tmp_path):
    tok = make()
    explicit, implicit = chat_rows()
    pairs = assert_same(tok, explicit, tmp_path, make.__name__ + "_explicit", max_length=48)
    assert pairs.stats["rows_truncated"] == 1  # the long reply
    assert_same(tok, implicit, tmp_path, make.__name__ + "_implicit", max_length=48)
    chosen = pairs.chosen[0].tolist()
    end_of_turn = tok.convert_tokens_to_ids(END_OF_TURN[make.__name__])
    assert end_of_turn in chosen[-3:] and chosen.count(tok.eos_token_id) <= 1  # no extra EOS
    prompt = pairs.prompt[0].tolist()
    assert prompt.count(tok.bos_token_id) == (make.__name__ in TEMPLATE_BOS)  # no second BOS


@pytest.mark.parametrize("make", CHATS, ids=CHAT_IDS)
def test_chat_rows_in_separate_mode_end_with_the_turn_and_one_bos(make, tmp_path):
    """tokenization="separate" renders the conversation as text and tokenizes the pieces without
    special tokens: a completion ends with the template's end-of-turn token (nothing appended
    after it) and the prompt holds the template's BOS once."""
    tok = make()
    explicit, _ = chat_rows()
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in explicit[:1]))
    pairs = D.load_pairs(D.Source(source=str(path), cache_dir=str(tmp_path / "c"),
                                      max_length=64, max_prompt_length=48,
                                      tokenization="separate"), tok)
    end = {"qwen_like": "<|im_end|>\n", "llama3_like": "<|eot_id|>",
           "gemma_like": "<end_of_turn>\n", "phi3_like": "<|end|>\n<|endoftext|>"}[make.__name__]
    assert tok.decode(pairs.chosen[0]) == "Yes, very." + end
    assert tok.decode(pairs.rejected[0]) == "No idea." + end
    assert pairs.prompt[0].tolist().count(tok.bos_token_id) == (make.__name__ in TEMPLATE_BOS)
