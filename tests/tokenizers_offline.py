"""Tokenizers built offline for the tests: GPT-2-style byte-level BPE, one that adds BOS the way
the Llama family's do, and chat templates shaped like Qwen's (ChatML), Llama 3's, Gemma's and
Phi-3's."""

from dpo_jax.bpe import train_byte_level_bpe

CORPUS = ["The film was good and the acting was great.", "The plot was bad, dull and slow.",
          "Is Alien good? Yes, very. No idea. Sure thing, surely not.",
          "the cat sat on the mat; the dog ran in the park"] * 30

# ChatML, as Qwen2/2.5/3 render it: every turn ends with <|im_end|> and a newline.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 3: the template writes BOS itself, turns end with <|eot_id|>.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
# Gemma 3: the template writes BOS, the assistant is "model", turns end with <end_of_turn> and a
# newline, and there is no system role (a system message is folded into the first user turn)
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
         "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
         "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
         "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
         "else m['role'] }}\n{{ prefix if loop.first else '' }}{{ m['content'] | trim }}"
         "<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# Phi-3 / Phi-4-mini: <|role|> headers, turns end with <|end|>, EOS after a finished conversation
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")


def gpt2_like(vocab_size=400):
    """Byte-level BPE, <|endoftext|> as BOS and EOS, no special tokens added by __call__."""
    return train_byte_level_bpe(CORPUS, vocab_size=vocab_size)


def _with_specials(specials: list[str], bos: str, eos: str, add_bos: bool, vocab_size=420):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:  # what Llama's tokenizers do on __call__: BOS in front of every text
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=eos)


def llama_like():
    """Adds BOS <s> on __call__; EOS </s>; no chat template."""
    return _with_specials(["<s>", "</s>"], "<s>", "</s>", add_bos=True)


def qwen_like():
    """ChatML template; EOS is <|im_end|> (Qwen's instruct tokenizers); no BOS."""
    t = _with_specials(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>",
                       "<|im_end|>", add_bos=False)
    t.chat_template = CHATML
    return t


def llama3_like():
    """Llama 3's template (BOS written by the template, turns end with <|eot_id|>) on a tokenizer
    that also adds BOS on __call__: the template path must not add a second one."""
    t = _with_specials(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                        "<|end_header_id|>"], "<|begin_of_text|>", "<|eot_id|>", add_bos=True)
    t.chat_template = LLAMA3
    return t


def gemma_like():
    """Gemma's template (BOS written by it, <end_of_turn>) on a tokenizer that adds BOS on
    __call__, EOS <eos>: the completions end with the turn, and the prompt holds one BOS."""
    t = _with_specials(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>",
                       "<eos>", add_bos=True)
    t.chat_template = GEMMA
    return t


def phi3_like():
    """Phi-3's template (turns end with <|end|>, EOS <|endoftext|> after the conversation)."""
    t = _with_specials(["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                       "<|endoftext|>", "<|endoftext|>", add_bos=False)
    t.chat_template = PHI3
    return t
