"""GPT-2 small on Anthropic HH preferences with the DPO paper's hyperparameters.

    python train.py --config configs/gpt2.py --workdir runs/gpt2

Needs the Hugging Face Hub (model, tokenizer and data); offline, point model_name_or_path and
dataset_name at local copies. Paper (Rafailov et al. 2023, App. B): beta 0.1, lr 1e-6 with RMSprop,
150 linear warmup steps, then constant, 64 pairs per update.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model_name_or_path = "gpt2"            # 124M; gpt2-medium / -large / -xl work too
    c.dataset_name = "Anthropic/hh-rlhf"     # chosen/rejected full dialogues (implicit prompt)
    c.dataset_test_split = "test"
    c.max_length = 512
    c.max_prompt_length = 256
    c.max_completion_length = 256            # the scoring window of the savings below
    c.layout = "prefix_sharing"              # prompt run once per pair (bench/RESULTS.md)
    c.beta = 0.1
    c.optim = "rmsprop"                      # as the paper's reference code
    c.learning_rate = 1e-6
    c.lr_scheduler_type = "constant"
    c.warmup_steps = 150
    c.train_batch_size = 8                   # 8 pairs x 8 micro-batches = 64 pairs per update
    c.gradient_accumulation_steps = 8
    c.eval_batch_size = 16
    c.length_buckets = (128, 256, 384)       # cut padding; at most 4 compiled shapes
    c.eval_steps = 500
    c.save_steps = 500
    return c
