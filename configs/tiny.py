"""A tiny GPT-2 (random init) on the small review-preference file shipped in data/tiny: offline,
well under a minute on 2 CPU cores.

    python train.py --config configs/tiny.py --workdir runs/tiny

The data (512 train / 64 eval pairs: review openings continued positively vs negatively) and its
byte-level BPE tokenizer come from ``python examples/reviews.py --out data/tiny``.
"""

import os

from configs import default

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "data", "tiny")


def get_config():
    c = default.get_config()
    c.model_name_or_path = ""                 # random init from c.model
    c.model.vocab_size = 512                  # the shipped tokenizer's size
    c.model.n_positions = 64
    c.model.n_embd = 64
    c.model.n_layer = 2
    c.model.n_head = 4
    c.tokenizer_name_or_path = os.path.join(DATA, "tokenizer")
    c.dataset_name = os.path.join(DATA, "train.jsonl")
    c.eval_dataset_name = os.path.join(DATA, "eval.jsonl")
    c.max_length = 48
    c.max_prompt_length = 16
    c.max_completion_length = 32              # the scoring window of the savings below
    c.layout = "prefix_sharing"               # prompt run once per pair
    c.beta = 0.1
    c.learning_rate = 3e-3                    # a tiny random model needs a large step
    c.warmup_steps = 8
    c.lr_scheduler_type = "cosine"
    c.weight_decay = 0.0
    c.train_batch_size = 8
    c.num_train_epochs = 1                    # 64 updates
    c.logging_steps = 4
    c.eval_steps = 32
    c.save_steps = 32
    return c
