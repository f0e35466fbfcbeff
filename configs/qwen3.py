"""Qwen3-0.6B on UltraFeedback (binarized), as TRL's DPO quick start runs it: TRL 1.16's
DPOConfig defaults (lr 1e-6, beta 0.1, 8 pairs per device, 3 epochs, linear decay without warmup,
gradient-norm clip 1.0, max_length 1024, bf16, gradient checkpointing).

    python train.py --config configs/qwen3.py --workdir runs/qwen3

Needs the Hugging Face Hub (model, tokenizer and data); offline, point model_name_or_path and
dataset_name at local copies. The rows are chat conversations (implicit prompt): rendered with
Qwen3's template, each reply ends with its own <|im_end|>. Memory: bench/RESULTS.md (Qwen3-0.6B).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model_name_or_path = "Qwen/Qwen3-0.6B"
    c.dataset_name = "trl-lib/ultrafeedback_binarized"
    c.dataset_test_split = "test"
    c.tokenization = "trl"                  # token for token as TRL 1.16
    c.max_length = 1024                     # TRL's default: each sequence keeps 1024 tokens
    c.max_completion_length = 1024          # the window holds any completion TRL keeps
    c.layout = "prefix_sharing"             # prompt run once per pair
    c.length_buckets = (256, 512, 1024, 1536)  # cut padding; at most 5 compiled shapes
    c.dtype = "bfloat16"                    # TRL's bf16; params and optimizer state float32
    c.ref_dtype = "bfloat16"                # the frozen reference in bf16
    c.remat = True                          # TRL's gradient checkpointing
    c.beta = 0.1
    c.learning_rate = 1e-6
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
