"""Configs of the controlled-sentiment demo (DPO paper, Section 6.1). Pick one after a colon:

    python examples/sentiment/demo.py --workdir runs/sentiment                       # mini
    python examples/sentiment/demo.py --workdir runs/imdb \\
        --config examples/sentiment/config.py:full                                   # the paper's

mini: offline, about ten minutes on 2 CPU cores. Synthetic reviews (corpus.py), a byte-level BPE
  tokenizer trained on them, a 4 x 128 GPT-2 trained from scratch by SFT, the classifier reward;
  DPO at four betas against IPO, SimPO, ORPO, Unlikelihood, Preferred-FT and best-of-N.
full: the paper's setting where the hub is reachable. IMDb reviews, GPT-2 (pretrained) SFT on
  them, the sentiment classifier ``lvwerra/distilbert-imdb`` as the reward.
tiny: the end-to-end test's (tests/test_sentiment_demo.py), seconds.
"""

import ml_collections


def get_config(preset: str = "mini"):
    c = ml_collections.ConfigDict()
    c.preset = preset

    # ---- corpus and model
    c.reviews = 4000                # synthetic reviews (mini); ignored when dataset_name is set
    c.dataset_name = ""             # hub id / file of real reviews, e.g. "stanfordnlp/imdb"
    c.dataset_split = "train"
    c.text_column = "text"
    c.tokenizer_name_or_path = ""   # "" = train a byte-level BPE on the corpus
    c.vocab_size = 1024             # of that BPE (about whole words on the synthetic corpus)
    c.model_name_or_path = ""       # "" = random init of the shape below (then SFT)
    c.model = ml_collections.ConfigDict(dict(n_layer=4, n_embd=128, n_head=4, n_positions=64))
    c.max_review_tokens = 32        # SFT rows are cut to this

    # ---- SFT (pi_ref): loss_type="sft" through the normal trainer
    c.sft_epochs = 3
    c.sft_batch_size = 32
    c.sft_learning_rate = 2e-3

    # ---- preference pairs: two pi_ref samples per prompt, chosen = the higher reward
    c.prompt_tokens = (2, 8)        # prompts are review prefixes of this many tokens (whole words)
    c.train_prompts = 1024
    c.eval_prompts = 256            # held out: eval pairs, and the reward / KL evaluation
    c.max_new_tokens = 24
    c.temperature = 1.0             # sampling temperature of pairs and evaluation (1 = pi itself)
    c.reward = "classifier"         # "classifier" | "lexicon" | "hf:<classifier id>" |
                                    # "module:function" (see reward.py)

    # ---- DPO and the baselines: the normal trainer, one run per (method, swept value, seed).
    # A method is "loss_type:config_key=v1,v2,..." (the swept key) plus optional fixed keys
    # ";key=value"; every run starts from pi_ref on the same pairs.
    c.methods = ml_collections.ConfigDict(dict(
        dpo="sigmoid:beta=0.1,0.3,1,4",
        ipo="ipo:beta=0.5,2",
        simpo="simpo:beta=1;simpo_gamma=0.5",
        orpo="orpo:beta=0.1,1",
        unlikelihood="unlikelihood:beta=0.1",
        preferred_ft="sft:learning_rate=1e-3",
    ))
    # ---- on-policy DPO (dpo_jax/online.py): from each offline DPO run of these betas, `rounds`
    # more rounds of sampling 2 completions of `prompts` train prompts from the current policy,
    # scoring them, pairing best against worst and training `epochs` on them; the reference
    # stays pi_ref. () = off. Needs reward "classifier" or "lexicon".
    c.online = ml_collections.ConfigDict(dict(betas=(0.3, 1.0, 4.0), rounds=2, prompts=384,
                                              epochs=1))
    c.seeds = (0, 1)
    c.dpo_epochs = 2
    c.dpo_batch_size = 32
    c.dpo_learning_rate = 3e-4
    c.best_of_n = (1, 2, 4, 8, 16)  # best-of-N from pi_ref: KL = log N - (N - 1) / N
    c.matched_kl = (0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 8.0)  # KLs (nats) where methods are ranked

    # ---- evaluation
    c.eval_samples = 2              # samples per held-out prompt, per model
    c.side_by_side = 6              # prompts shown with pi_ref / pi_theta completions

    if preset == "tiny":
        c.reviews = 1000
        c.model = ml_collections.ConfigDict(dict(n_layer=2, n_embd=64, n_head=4, n_positions=48))
        c.max_review_tokens = 24
        c.sft_epochs = 3
        c.sft_learning_rate = 3e-3
        c.train_prompts = 384
        c.eval_prompts = 64
        c.max_new_tokens = 12
        c.methods = ml_collections.ConfigDict(dict(dpo="sigmoid:beta=0.5",
                                                   preferred_ft="sft:learning_rate=1e-3"))
        c.online = ml_collections.ConfigDict(dict(betas=(0.5,), rounds=1, prompts=96,
                                                  epochs=1))
        c.best_of_n = (1, 4)
        c.seeds = (0,)
        c.dpo_epochs = 4
        c.dpo_batch_size = 16
        c.dpo_learning_rate = 2e-3
        c.side_by_side = 2
    elif preset == "full":
        c.dataset_name = "stanfordnlp/imdb"
        c.tokenizer_name_or_path = "gpt2"
        c.model_name_or_path = "gpt2"
        c.max_review_tokens = 256
        c.sft_epochs = 1
        c.sft_batch_size = 32
        c.sft_learning_rate = 1e-5
        c.train_prompts = 20000
        c.eval_prompts = 512
        c.max_new_tokens = 48
        c.reward = "hf:lvwerra/distilbert-imdb"
        c.online = ml_collections.ConfigDict(dict(betas=(), rounds=2, prompts=2048, epochs=1))
        c.seeds = (0, 1, 2)
        c.dpo_epochs = 1
        c.dpo_batch_size = 64
        c.dpo_learning_rate = 1e-6
        c.eval_samples = 4
    elif preset != "mini":
        raise ValueError(f"unknown preset {preset!r}: mini, full or tiny")
    return c
