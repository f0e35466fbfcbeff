"""Phi-4-mini-instruct (3.8B) on UltraFeedback (binarized), LoRA, with TRL 1.16's DPO defaults.

    python train.py --config configs/phi4_mini.py --workdir runs/phi4-mini

Needs the Hugging Face Hub (model, tokenizer and data); offline, point model_name_or_path and
dataset_name at local copies. The checkpoint's fused qkv_proj and gate_up_proj are split into
separate matrices on import and fused again in the export. LoRA adapts o_proj and down_proj
only: PEFT puts one adapter on each fused matrix, which this project's per-matrix adapters
cannot export (full tuning adapts everything). Its longrope RoPE is exact up to
original_max_position_embeddings (4096 tokens), a length limit here; Phi-4-mini's chat template
ends each turn with <|end|>.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model_name_or_path = "microsoft/Phi-4-mini-instruct"
    c.dataset_name = "trl-lib/ultrafeedback_binarized"
    c.dataset_test_split = "test"
    c.tokenization = "trl"
    c.max_length = 1024
    c.max_completion_length = 1024
    c.layout = "prefix_sharing"
    c.length_buckets = (256, 512, 1024, 1536)
    c.dtype = "bfloat16"
    c.ref_dtype = "bfloat16"
    c.remat = True
    c.lora_rank = 16
    c.lora_alpha = 32.0
    c.lora_target = r"layers\.(self_attn\.o_proj|mlp\.down_proj)"
    c.beta = 0.1
    c.learning_rate = 5e-6                  # LoRA takes a larger step than full tuning
    c.lr_scheduler_type = "linear"
    c.warmup_steps = 0
    c.max_grad_norm = 1.0
    c.weight_decay = 0.0
    c.train_batch_size = 8
    c.eval_batch_size = 8
    c.num_train_epochs = 3
    c.logging_steps = 10
    c.eval_steps = 500
    c.save_steps = 500
    return c
