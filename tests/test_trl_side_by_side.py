"""Issue 25: the real TRL 1.16 DPOTrainer and ours, side by side, on the same tiny Llama, tokens
and hyper-parameters (AdamW, lr 1e-3, 3 steps of the same 8 pairs): every metric TRL logs within
1e-4 (2e-4 relative above magnitude 2) at every step, and the trained weights within 1e-4
relative. One known difference is asserted as such: at step 1 TRL's rewards are exactly 0, and
so its strict rewards/accuracies; ours are scored the same way for policy and reference (exactly
0 for GPT-2, tests/test_train.py), but in this Llama's train step XLA fuses the policy's forward,
whose activations the backward pass keeps, apart from the reference's, so their last bits may
differ (rewards within 1e-6, and the strict accuracy counts such a pair as a win)."""

import json

import numpy as np
import pytest

trl = pytest.importorskip("trl", reason="trl is the reference of these tests")
torch = pytest.importorskip("torch")
import datasets  # noqa: E402
import transformers  # noqa: E402

from tokenizers_offline import llama_like  # noqa: E402
from trainutil import tiny_config  # noqa: E402
from dpo_jax.trainer import train_and_evaluate  # noqa: E402

STEPS = 3
ROWS = [{"prompt": f"The film number {i} was", "chosen": " good and fun" + " very" * (i % 3),
         "rejected": " bad" + " and dull" * (i % 4)} for i in range(8)]
# TRL's DPOConfig keys -> ours, where they differ
CASES = {
    "sigmoid": ({}, {}),
    "sigmoid_norm": ({"loss_type": ["sigmoid_norm"]}, {"loss_type": "sigmoid_norm"}),
    "forward_kl": ({"f_divergence_type": "forward_kl"}, {"f_divergence_type": "forward_kl"}),
    "ld_alpha": ({"ld_alpha": 0.5}, {"ld_alpha": 0.5}),
    "ld_alpha+sft": ({"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5},
                     {"loss_type": "sigmoid,sft", "ld_alpha": 0.5}),
    "wpo": ({"use_weighting": True}, {"use_weighting": True}),
    "sft": ({"loss_type": ["sft"]}, {"loss_type": "sft"}),
    "tr-dpo": ({"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
               {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5}),
    "weight_decay": ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    "lora": ({}, {"lora_rank": 4, "lora_alpha": 8.0, "lora_target": r".*\.(q|v)_proj"}),
    "remat": ({"gradient_checkpointing": True}, {"remat": True}),
    # issue 30: TRL on the base bitsandbytes loads in NF4 or int8 (a wider Llama: NF4 blocks of 64
    # inputs), ours with quantize_base="nf4" on the same checkpoint; plain SGD, so the adapters'
    # moves are the sums of the (clipped) gradients, compared to 1e-4 of their size
    "qlora": ({"optim": "sgd", "learning_rate": 0.1},
              {"lora_rank": 4, "lora_alpha": 8.0, "lora_target": r".*\.(q|v)_proj",
               "quantize_base": "nf4", "optim": "sgd", "learning_rate": 0.1}),
    "qlora-int8": ({"optim": "sgd", "learning_rate": 0.1},
                   {"lora_rank": 4, "lora_alpha": 8.0, "lora_target": r".*\.(q|v)_proj",
                    "quantize_base": "int8", "optim": "sgd", "learning_rate": 0.1}),
    "qlora-gpt2": ({"optim": "sgd", "learning_rate": 0.1},
                   {"lora_rank": 4, "lora_alpha": 8.0, "lora_target": r"h\.attn\.c_attn",
                    "quantize_base": "nf4", "double_quant": True, "optim": "sgd",
                    "learning_rate": 0.1}),
}
# the QLoRA cases' bases (NF4 blocks of 64 inputs: 64 wide) and PEFT's target modules
BASES = {"qlora": ("base64", ["q_proj", "v_proj"]), "qlora-gpt2": ("gpt2_64", ["c_attn"]),
         "qlora-int8": ("base64", ["q_proj", "v_proj"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("side")
    tok = llama_like()
    tok.save_pretrained(root / "tok")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    torch.manual_seed(0)
    wide = dict(cfg.to_dict(), hidden_size=64, intermediate_size=128, head_dim=16)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**wide)).save_pretrained(
        root / "base64")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(
        root / "gpt2_64")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root, tok


def trl_run(root, tok, name, theirs, lora):
    import peft
    torch.manual_seed(0)
    base, targets = BASES.get(name, ("base", ["q_proj", "v_proj"]))
    if name in BASES:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 reference")
        quantization = (dict(load_in_8bit=True) if name == "qlora-int8" else dict(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=name == "qlora-gpt2"))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            root / base, dtype=torch.float32,
            quantization_config=transformers.BitsAndBytesConfig(**quantization))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    if lora:  # the adapter both sides start from: PEFT's init (B = 0), saved first
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=targets))
        model.save_pretrained(root / f"{name}-init")
    kw = dict(output_dir=str(root / f"{name}-trl"), per_device_train_batch_size=8,
              max_steps=STEPS, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
              bf16=False, gradient_checkpointing=False, lr_scheduler_type="constant",
              warmup_steps=0, save_strategy="no", beta=0.1, max_length=64, seed=0)
    args = trl.DPOConfig(**{**kw, **theirs})
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trl.DPOTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(ROWS))
    if name in BASES:  # TRL casts a quantized base's adapters to bfloat16 (QLoRA's paper);
        # ours train in float32, as every trainable param: compared in float32 both, from the
        # same (unrounded) adapters
        for n, p in trainer.model.named_parameters():
            if n in start:
                p.data = start[n]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if name in BASES:  # the trained adapters (PEFT's merge would requantize the base)
        return logs, {k.replace(".default", ""): v.detach().numpy()
                      for k, v in trainer.model.state_dict().items() if ".default." in k}
    model = trainer.model.merge_and_unload() if lora else trainer.model
    return logs, {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CASES))
def test_trl_and_we_log_the_same_numbers(setup, tmp_path, name):
    root, tok = setup
    theirs, ours = CASES[name]
    lora = "lora_rank" in ours
    logs, weights = trl_run(root, tok, name, theirs, lora)
    base = root / BASES.get(name, ("base",))[0]
    c = tiny_config(tmp_path, model_name_or_path=str(base),
                    tokenizer_name_or_path=str(root / "tok"),
                    dataset_name=str(root / "pairs.jsonl"), dataset_test_split="",
                    eval_dataset_name="", max_length=64, max_completion_length=0, layout="pair",
                    train_batch_size=8, max_steps=STEPS,
                    lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                    logging_steps=1, sample_prompts=0, mesh_data=1, report_to="none",
                    lora_init=str(root / f"{name}-init") if lora else "",
                    **{"learning_rate": 1e-3, **ours})
    train_and_evaluate(c, tmp_path / "wd")
    rows = [json.loads(r) for r in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(logs) == STEPS
    for step, (t, o) in enumerate(zip(logs, rows), 1):
        for key, want in t.items():
            if key in ("epoch", "step") or f"train/{key}" not in o:
                continue
            got = o[f"train/{key}"]
            if step == 1 and key.startswith("rewards/"):
                assert want == 0.0  # TRL: the policy is the reference
                if key != "rewards/accuracies":
                    assert abs(got) <= 1e-6, (name, key, got)
                continue  # the known difference (module docstring)
            tol = 1e-4 if abs(want) <= 2 else 2e-4 * abs(want)
            assert abs(got - want) <= tol, (name, step, key, got, want)
        missing = {k for k in t if k not in ("epoch", "step")} - {k[6:] for k in o}
        assert not missing, (name, missing)  # every metric TRL logs, we log
    from safetensors.numpy import load_file
    ours_w = load_file(str(tmp_path / "wd" / ("adapter/adapter_model.safetensors"
                                              if name in BASES else "hf/model.safetensors")))
    init = (load_file(str(root / f"{name}-init" / "adapter_model.safetensors"))
            if name in BASES else {})
    for key, want in weights.items():
        got = ours_w[key]
        if key in init:  # what training moved, on both sides
            got, want = got - init[key], want - init[key]
        scale = max(np.abs(want).max(), 1e-3)
        # double quantized: bnb's scale offset is torch's float32 sum, ours the mean rounded
        # once; they differ in the last bit for 2 of the 8 matrices, and one of 208 scales'
        # 8-bit codes rounds the other way (1.6e-4 here; with bnb's offset, within 1e-4)
        rel = 5e-4 if ours.get("double_quant") else 1e-4
        assert np.abs(got - want).max() <= rel * scale, (name, key)
