"""A tiny Gemma-3-family model (random init: a 16-token sliding window on the local layer, a
global layer, q/k norms, tied embeddings) on the small review-preference file shipped in
data/tiny: offline, seconds on 2 CPU cores. The Gemma twin of configs/tiny.py.

    python train.py --config configs/tiny_gemma.py --workdir runs/tiny_gemma
"""

import ml_collections

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.model = ml_collections.ConfigDict(dict(  # an HF Gemma3TextConfig in miniature
        model_type="gemma3_text",     # gemma2 | gemma3_text: one family module
        vocab_size=512,               # the shipped tokenizer's size
        hidden_size=64,               # width
        intermediate_size=128,        # GeGLU width
        num_hidden_layers=2,          # decoder layers
        num_attention_heads=4,        # query heads
        num_key_value_heads=2,        # KV heads: grouped-query attention
        head_dim=16,
        query_pre_attn_scalar=16,     # attention scale = this ** -0.5
        sliding_window=16,            # shorter than the pairs: the local layer's window bites
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128,  # the longest sequence
    ))
    return c
