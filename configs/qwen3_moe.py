"""Qwen3-30B-A3B (128 experts, 8 active) on UltraFeedback (binarized) with LoRA on attention, bf16,
for a pod slice: each layer's 128 experts split over an expert axis of 8 (tokens exchanged by
all-gather / reduce-scatter), FSDP over the rest of the devices (16 per expert group on a v5p-256).

    python train.py --config configs/qwen3_moe.py --workdir gs://BUCKET/qwen3-moe \\
        --config.distributed=True          # on every worker (launch/tpu_pod.sh does it)

Needs the Hugging Face Hub (model, tokenizer and data); offline, point model_name_or_path and
dataset_name at local copies. The experts run dropless (grouped matmuls over the tokens routed to
each); router_aux_loss_coef adds the router's load-balancing loss (Qwen3-MoE's own coefficient is
0.001; TRL adds it only where the model config sets output_router_logits).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model_name_or_path = "Qwen/Qwen3-30B-A3B"
    c.dataset_name = "trl-lib/ultrafeedback_binarized"
    c.dataset_test_split = "test"
    c.tokenization = "trl"
    c.max_length = 1024
    c.max_completion_length = 1024
    c.layout = "prefix_sharing"
    c.dtype = "bfloat16"
    c.ref_dtype = "bfloat16"
    c.remat = True
    c.lora_rank = 16
    c.lora_alpha = 32.0
    c.router_aux_loss_coef = 0.001
    c.mesh_data, c.mesh_fsdp, c.mesh_expert, c.mesh_tensor = 1, -1, 8, 1
    c.beta = 0.1
    c.learning_rate = 5e-6
    c.lr_scheduler_type = "linear"
    c.warmup_steps = 0
    c.max_grad_norm = 1.0
    c.train_batch_size = 64
    c.eval_batch_size = 64
    c.num_train_epochs = 1
    c.logging_steps = 10
    c.eval_steps = 200
    c.save_steps = 200
    return c
