"""dpo_jax/config.py: typed groups built once from the flat keys, each key checked by the group
that owns it, resume keys derived, TRL's names resolved (issues 24 and 25)."""

import logging

import pytest

from trainutil import tiny_config
from dpo_jax import config as configs
from dpo_jax.errors import ConfigError

# The keys a resume compared before the keys moved into their groups (workdir.RUN_KEYS), less
# the tokens' fingerprint: checkpoints written then must resume the same way now.
OLD_RUN_KEYS = (
    "model_name_or_path", "tokenizer_name_or_path", "dtype", "ref_dtype", "lora_rank",
    "lora_alpha", "lora_dropout", "lora_target", "dataset_name", "dataset_train_split",
    "prompt_column", "chosen_column", "rejected_column", "tokenization", "max_length",
    "max_prompt_length", "max_completion_length", "add_bos", "on_bad_row", "length_buckets",
    "train_batch_size", "gradient_accumulation_steps", "packing", "pack_rows", "optim",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "min_lr_ratio", "weight_decay",
    "decay_biases_and_norms", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "loss_type", "loss_weights", "beta", "label_smoothing", "reference_free", "rpo_alpha",
    "simpo_gamma", "discopop_tau", "ld_alpha", "use_weighting", "f_divergence_type",
    "f_alpha_divergence_coef", "token_metrics", "sync_ref_model", "ref_model_mixup_alpha",
    "ref_model_sync_steps", "seed")


def test_groups_hold_every_key_once_and_the_resume_keys_are_derived():
    keys = [f.name for _, cls in configs.GROUPS.items() for f in configs.K.fields(cls)]
    assert len(keys) == len(set(keys))  # one owner per key
    assert set(configs.resume_keys()) == set(OLD_RUN_KEYS) | {
        "use_dora", "router_aux_loss_coef", "quantize_base", "quantize_embeddings", "double_quant",
        "ref_model_name_or_path", *(f.name for f in configs.K.fields(configs.OnlineConfig)
                                    if f.name != "online_batch_size")}
    cfg = configs.build({**configs.defaults().to_dict(), "dataset_name": "x.jsonl"})
    assert cfg.optim.learning_rate == 1e-6 and cfg.loss.loss_type == ("sigmoid",)


@pytest.mark.parametrize("override, fragment", [
    (dict(learnig_rate=1.0), "unknown config key 'learnig_rate'; did you mean learning_rate?"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(lora_dropout=1.0), "config key lora_dropout=1.0: must lie in [0, 1)"),
    (dict(max_prompt_length=48, tokenization="separate"), "max_prompt_length=48 and max_length=48"),
    (dict(use_dora=True), "use_dora=True needs lora_rank > 0"),
    (dict(mesh_data=-1, mesh_fsdp=-1), "at most one may be -1"),
    (dict(loss_type="sigmoid,sft", loss_weights="1,-0.5"), "a weight must be >= 0"),
    (dict(report_to="tensorbord"), "config key report_to='tensorbord'"),
    (dict(output_dir="runs/x"), "config key output_dir (TRL's name): pass --workdir runs/x"),
    (dict(warmup_ratio=0.1), "set warmup_steps"),
    (dict(disable_dropout=False), "run without dropout"),
    (dict(truncation_mode="keep_end"), "only keep_start is offered"),
    (dict(precompute_ref_batch_size=4), "batches of eval_batch_size"),
    (dict(lora_rank=4, load_in_4bit=True, bnb_4bit_quant_type="fp4"),
     "config key bnb_4bit_quant_type='fp4' (TRL's name): the 4-bit base is NF4 only"),
    (dict(lora_rank=4, load_in_8bit=True, use_bnb_nested_quant=True),
     "config key double_quant=True quantizes NF4's block scales, and quantize_base='int8'"),
    (dict(load_in_4bit=True), "config key quantize_base='nf4' quantizes the frozen base of LoRA"),
    (dict(quantize_base="int8"), "config key quantize_base='int8'"),
])
def test_a_bad_key_is_one_line_naming_it(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as e:
        configs.build(tiny_config(tmp_path, **override))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_trl_names_are_resolved_and_logged_once(tmp_path, caplog):
    """A TRL DPO quick-start's keys, under TRL's names, mean what they mean in TRL."""
    import jax
    caplog.set_level(logging.INFO, logger="dpo_jax.config")
    cfg = configs.build(tiny_config(
        tmp_path, bf16=True, gradient_checkpointing=True, per_device_train_batch_size=2,
        per_device_eval_batch_size=1, lora_r=8, lora_target_modules="q_proj,v_proj",
        padding_free=True, disable_dropout=True, truncation_mode="keep_start",
        optim="adamw_torch_fused", layout="pair"))
    devices = jax.device_count()  # the simulated devices of conftest
    assert cfg.model.dtype == "bfloat16" and cfg.model.remat
    assert cfg.optim.train_batch_size == 2 * devices and cfg.optim.eval_batch_size == devices
    assert cfg.tuning.lora_rank == 8 and cfg.tuning.lora_target == r".*\.(q_proj|v_proj)"
    assert cfg.layout.packing == "exact" and cfg.optim.optim == "adamw"
    assert cfg.flat.bf16 is None and cfg.flat.dtype == "bfloat16"  # config.json: ours
    said = [r.getMessage() for r in caplog.records if "TRL's" in r.getMessage()]
    assert len(said) == 10 and any("bf16=True (TRL's name): dtype='bfloat16'" in s for s in said)
    use_peft = configs.build(tiny_config(tmp_path, use_peft=True))
    assert use_peft.tuning.lora_rank == 16
    qlora = configs.build(tiny_config(tmp_path, use_peft=True, load_in_4bit=True,
                                      use_bnb_nested_quant=True))
    assert qlora.tuning.quantize_base == "nf4" and qlora.tuning.double_quant


def test_a_loss_option_and_the_table_agree():
    table = configs.table()
    for key in configs.defaults():
        if key != "model":
            assert f"| `{key}` |" in table, key
    assert "| `max_grad_norm` | `10.0` |" in table and "TRL's default 1.0" in table


def test_discopop_warns_once_at_the_start(tmp_path, caplog):
    """Issue 25: discopop from a fresh start can learn the wrong preference (its formula at
    z = 0, as in TRL); the config layer says so once, and not for other losses."""
    caplog.set_level(logging.WARNING, logger="dpo_jax.config")
    configs.build(tiny_config(tmp_path, loss_type="sigmoid"))
    assert not [r for r in caplog.records if "discopop" in r.getMessage()]
    configs.build(tiny_config(tmp_path, loss_type="discopop"))
    said = [r.getMessage() for r in caplog.records if "discopop" in r.getMessage()]
    assert len(said) == 1 and "rewards/accuracies" in said[0]
