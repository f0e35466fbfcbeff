"""Gemma 3 1B (instruct) on UltraFeedback (binarized), with TRL 1.16's DPO defaults: the model
of TRL's long-sequence DPO benchmark and of tunix's and MaxText's DPO examples.

    python train.py --config configs/gemma3_1b.py --workdir runs/gemma3-1b

Needs the Hugging Face Hub (model, tokenizer and data; Gemma's licence must be accepted there);
offline, point model_name_or_path and dataset_name at local copies. The rows are chat
conversations: rendered with Gemma's template (<start_of_turn>, no system role, BOS by the
template), each reply ends with its own <end_of_turn>. Its local layers attend within a
512-token window and its global layers over everything: XLA attention on every platform (the
fused kernels here take neither the window nor the soft-caps). Variants:

    --config.lora_rank=16 --config.lora_alpha=32 --config.learning_rate=5e-6   # LoRA
    --config.use_dora=True --config.lora_rank=16 --config.learning_rate=5e-6   # DoRA
    --config.mesh_fsdp=-1 --config.mesh_data=1 --workdir gs://BUCKET/RUN        # a pod slice
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model_name_or_path = "google/gemma-3-1b-it"
    c.dataset_name = "trl-lib/ultrafeedback_binarized"
    c.dataset_test_split = "test"
    c.tokenization = "trl"                  # token for token as TRL 1.16
    c.max_length = 1024                     # TRL's default
    c.max_completion_length = 1024
    c.layout = "prefix_sharing"             # the prompt run once per pair
    c.length_buckets = (256, 512, 1024, 1536)
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
