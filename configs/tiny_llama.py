"""A tiny Llama-family model (random init: GQA, untied head) on the small review-preference file
shipped in data/tiny: offline, seconds on 2 CPU cores. The Llama-family twin of configs/tiny.py.

    python train.py --config configs/tiny_llama.py --workdir runs/tiny_llama
"""

import ml_collections

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.model = ml_collections.ConfigDict(dict(  # an HF LlamaConfig in miniature
        model_type="llama",           # llama | mistral | qwen2 | qwen3: one family module
        vocab_size=512,               # the shipped tokenizer's size
        hidden_size=64,               # width
        intermediate_size=128,        # SwiGLU width
        num_hidden_layers=2,          # decoder layers
        num_attention_heads=4,        # query heads
        num_key_value_heads=2,        # KV heads: grouped-query attention
        max_position_embeddings=128,  # the longest sequence
        tie_word_embeddings=False,    # an untied LM head, as Llama 3.x 1B+ and Qwen3-0.6B+
    ))
    return c
