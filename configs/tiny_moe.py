"""A tiny mixture-of-experts model (random init: Qwen3-MoE's layout, 4 experts, top-2,
dropless) on the small review-preference file shipped in data/tiny: offline, seconds on 2 CPU
cores. The MoE twin of configs/tiny.py.

    python train.py --config configs/tiny_moe.py --workdir runs/tiny_moe
"""

import ml_collections

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.model = ml_collections.ConfigDict(dict(  # an HF Qwen3MoeConfig in miniature
        model_type="qwen3_moe",       # qwen3_moe | mixtral | olmoe: one family module
        vocab_size=512,               # the shipped tokenizer's size
        hidden_size=64,               # width
        moe_intermediate_size=48,     # each expert's SwiGLU width
        num_experts=4,                # experts per layer
        num_experts_per_tok=2,        # top-k routing, no token dropped
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
    ))
    return c
