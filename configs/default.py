"""Every config key, with its default and meaning. The other configs start from this one.

Not meant to be run as is (it names no data); see configs/tiny.py and configs/gpt2.py.
Key names follow TRL's DPOConfig where one exists, with the same meaning except where the README's
"Where we follow TRL 1.16, and where not" says (cDPO smoothing, identical pairs dropped, the
whole-word implicit prompt, max_prompt_length / max_completion_length).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()

    # ---- model
    c.model_name_or_path = "gpt2"  # HF hub id or local HF folder; "" = random init from c.model
    # Architecture for random init (ignored otherwise): an HF config.json in miniature, its
    # model_type naming the family (gpt2 | llama | mistral | qwen2 | qwen3) and the other keys
    # that family's config.json fields (see configs/tiny_llama.py for a Llama-family one).
    c.model = ml_collections.ConfigDict(dict(
        model_type="gpt2",  # HF model_type: which family (dpo_jax/models/)
        vocab_size=50257,   # tokens; set to the tokenizer's size
        n_positions=1024,   # max sequence length the position table holds
        n_embd=768,         # width
        n_layer=12,         # transformer blocks
        n_head=12,          # attention heads
    ))
    c.tokenizer_name_or_path = ""  # HF tokenizer folder or hub id; "" = the model's
    c.dtype = "float32"            # compute dtype: float32 | bfloat16 (params stay float32)
    c.ref_dtype = ""               # frozen params' dtype (the reference; LoRA's base): "" = float32
    c.remat = False                # recompute each block's activations in the backward pass
    c.remat_policy = "nothing_saveable"  # or dots_saveable / dots_with_no_batch_dims_saveable
    c.attention = "auto"           # auto (cudnn on GPU, splash on TPU, else xla) | xla | cudnn | splash

    # ---- LoRA and DoRA (dpo_jax/tuning/): adapters train; the base, adapters off, is the ref
    c.lora_rank = 0                # adapter rank r; 0 = full fine-tuning
    c.lora_alpha = 16.0            # adapters scale by alpha / r (PEFT's)
    c.lora_dropout = 0.0           # dropout on the adapters' input while training
    c.lora_target = ""             # regex over Linear paths; "" = the family's (attention + MLP)
    c.lora_init = ""               # a PEFT adapter folder to start from; "" = fresh (B = 0)
    c.use_dora = False             # DoRA: a trained magnitude per output times LoRA's direction

    # ---- devices (dpo_jax/sharding.py)
    c.mesh_data = -1               # data-parallel axis size; -1 = the devices left over
    c.mesh_fsdp = 1                # fully sharded data-parallel axis (params + optimizer split)
    c.mesh_tensor = 1              # tensor-parallel axis (heads and MLP units split)
    c.distributed = False          # multi-host: call jax.distributed.initialize() first
    c.coordinator_address = ""     # host:port of process 0; "" = auto-detect (SLURM, TPU, MPI)
    c.num_processes = 0            # processes in the job; 0 = auto-detect
    c.process_id = -1              # this process's index; -1 = auto-detect

    # ---- data (dpo_jax/data.py)
    c.dataset_name = ""            # hub id, .json/.jsonl/.parquet/.csv file, or save_to_disk folder
    c.dataset_train_split = "train"  # split of a hub / save_to_disk dataset to train on
    c.eval_dataset_name = ""       # "" = dataset_name (its dataset_test_split); a file or hub id
    c.dataset_test_split = "test"  # split to evaluate on; "" = no evaluation
    c.prompt_column = "prompt"     # column of the prompt; absent = implicit (shared prefix)
    c.chosen_column = "chosen"     # column of the preferred completion (or full text)
    c.rejected_column = "rejected"  # column of the dispreferred completion (or full text)
    c.tokenization = "trl"         # "trl": as TRL 1.16 (joint, EOS if missing, tokenizer's BOS);
    #                                "separate": the paper's code (apart, add_bos, prompt cut)
    c.max_length = 512             # tokens of prompt + a completion (trl: each sequence is cut)
    c.max_prompt_length = 128      # "separate" only: a cut prompt keeps its last this-many tokens
    c.max_completion_length = 0    # > 0: cap completions (the static window of the two savings)
    c.add_bos = False              # "separate" only: prepend the tokenizer's BOS to prompts
    c.on_bad_row = "error"         # bad rows: "error" (name file and row) | "skip" (drop, count)
    c.length_buckets = ()          # padded lengths besides max_length, e.g. (128, 256); () = none
    c.data_cache_dir = ""          # tokenization cache; "" = next to the data (~/.cache for hub)

    # ---- loss (dpo_jax/losses.py)
    c.loss_type = "sigmoid"        # a registered loss, or several: "sigmoid,sft"
    c.loss_weights = ""            # comma-separated weights for several losses; "" = all 1
    c.beta = 0.1                   # the KL strength beta (ORPO's lambda)
    c.label_smoothing = 0.0        # e: label-noise rate (cDPO for sigmoid, unlike TRL 1.16; rDPO, EXO)
    c.reference_free = False       # take the reference log-ratios as 0
    c.rpo_alpha = 0.0              # > 0 adds alpha * per-token NLL of chosen (RPO); 0 = off
    c.simpo_gamma = 0.5            # SimPO's target margin
    c.discopop_tau = 0.05          # DiscoPOP's temperature
    c.ld_alpha = 1.0               # LD-DPO: weight of each completion's tokens past the shorter's
    #   length (TRL's ld_alpha; 1 = no weighting, TRL's None)
    c.use_weighting = False        # WPO: weight each pair by the policy's per-token probability
    c.f_divergence_type = "reverse_kl"  # f-DPO: reverse_kl (DPO) | forward_kl | js_divergence |
    #   alpha_divergence
    c.f_alpha_divergence_coef = 0.5  # alpha of alpha_divergence
    c.token_metrics = True         # log TRL's entropy, logits/*, mean_token_accuracy (about 5%
    #   of a CPU step at GPT-2 small; False skips them where no loss option needs the pass)
    c.sync_ref_model = False       # TR-DPO: mix the reference toward the policy ...
    c.ref_model_mixup_alpha = 0.6  # ... ref = alpha * policy + (1 - alpha) * ref ...
    c.ref_model_sync_steps = 512   # ... every this many updates
    c.precompute_ref_log_probs = False  # score the data with the reference once, before training
    c.logprob_chunk_size = 1024    # positions per LM-head chunk; 0 = whole batch at once
    c.completion_only_head = True  # LM head only where completions are scored (needs the cap)
    c.layout = "pair"              # "pair": 2 rows per pair; "prefix_sharing": 1 row, prompt once
    c.packing = "none"             # pairs packed into rows: none | exact | balanced | budget
    #   (needs max_completion_length > 0) "exact": the unpacked run's batches; "balanced":
    #   batches regrouped to even token totals; "budget": as many pairs as fill the rows
    #   (at most 2 x the batch size; the fastest, pairs per update vary)
    c.pack_rows = 0                # packed rows per micro-batch; 0 = sized from the data
    #   (the fewest that fit every batch; "budget": what a batch of mean-length pairs fills)

    # ---- optimization (dpo_jax/optim.py)
    c.optim = "adamw"              # adamw | rmsprop | adafactor | sgd
    c.learning_rate = 1e-6         # peak learning rate
    c.lr_scheduler_type = "linear"  # after warmup: constant | cosine | linear (decay to min)
    c.warmup_steps = 150           # linear warmup from 0, in updates
    c.min_lr_ratio = 0.0           # decay ends at learning_rate * this
    c.weight_decay = 0.0           # decoupled for adamw/adafactor, L2 for rmsprop; matrices only
    c.decay_biases_and_norms = False  # True: decay biases and norm scales too
    c.adam_beta1 = 0.9             # Adam first-moment decay
    c.adam_beta2 = 0.999           # Adam second-moment decay; also rmsprop's decay
    c.adam_epsilon = 1e-8          # Adam / rmsprop epsilon
    c.max_grad_norm = 10.0         # clip the global gradient norm; 0 = off
    c.train_batch_size = 8         # pairs per micro-batch, global (TRL: per-device x devices)
    c.gradient_accumulation_steps = 1  # micro-batches per update (exact accumulation)
    c.eval_batch_size = 8          # pairs per eval batch
    c.num_train_epochs = 1         # epochs, when max_steps <= 0
    c.max_steps = -1               # updates to run; <= 0 = num_train_epochs worth

    # ---- loop (dpo_jax/trainer.py)
    c.seed = 0                     # data order, random init and sampling
    c.logging_steps = 10           # log train metrics every this many updates
    c.eval_steps = 100             # evaluate every this many updates (and at the end); 0 = end only
    c.save_steps = 100             # checkpoint every this many updates (and at the end)
    c.save_total_limit = 3         # checkpoints kept
    c.export_hf = True             # at the end, write the policy as an HF folder to workdir/hf
    c.progress_bar = True          # tqdm bar on stderr
    c.sample_prompts = 2           # eval prompts whose pi_ref / pi_theta completions are compared at
    #   every eval (samples.jsonl, the trackers) and at the end; 0 = none
    c.sample_max_new_tokens = 32   # tokens per such completion
    c.sample_temperature = 0.0     # 0 = greedy
    c.sample_top_k = 0             # 0 = off
    c.sample_top_p = 1.0           # 1 = off
    c.report_to = "tensorboard"    # trackers: tensorboard, wandb (pip install wandb), both
    #   ("tensorboard,wandb") or none; metrics.jsonl is always written
    c.wandb_project = "dpo_jax"    # wandb's project; its run is named after the workdir
    c.allow_resume_changes = ""    # keys a resume may change (comma-separated, or "all")
    return c
