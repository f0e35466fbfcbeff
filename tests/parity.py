"""Helpers of the parity tests: transformers' PyTorch models as the numerical reference.

torch is imported inside the helpers, so importing this module never needs it.
"""

import numpy as np

TINY = dict(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4)
# GPT-2's real vocabulary and context with a tiny trunk: exercises the big head and positions.
WIDE_VOCAB = dict(vocab_size=50257, n_positions=1024, n_embd=64, n_layer=2, n_head=4)


def perturb_norms_and_biases(model, scale=0.02):
    """HF inits biases and norm scales to 0/1; move them so a parity test checks every tensor."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(scale * torch.randn_like(p))
    return model


def make_torch_gpt2(seed=0, **kw):
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(bos_token_id=kw["vocab_size"] - 1,
                                  eos_token_id=kw["vocab_size"] - 1, **kw)
    return perturb_norms_and_biases(transformers.GPT2LMHeadModel(cfg).eval())


def torch_logits(model, ids, mask):
    """HF logits with position ids from the mask (what `generate` does for left padding)."""
    import torch
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.double().numpy()


def torch_sequence_logprobs(model, ids, mask, loss_mask):
    """Reference: torch log_softmax + gather, summed where loss_mask is 1 (token t scored at t-1)."""
    import torch
    logits = torch.tensor(torch_logits(model, ids, mask))
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids)[:, 1:, None])[..., 0]
    m = torch.tensor(loss_mask[:, 1:], dtype=torch.float64)
    return (lp * m).sum(-1).numpy(), m.sum(-1).numpy()


def padded_batch(rng, vocab, b=4, t=24):
    """Random ids with a right-padded row, a left-padded row and a full row, plus a loss mask
    that covers a completion-like span of each row's real tokens."""
    ids = rng.integers(0, vocab, (b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, t - 7:] = 0          # right padding
    mask[2, :6] = 0              # left padding
    if b > 3:
        mask[3, :3] = 0
        mask[3, t - 2:] = 0
    loss_mask = mask.copy()
    loss_mask[:, : t // 3] = 0   # "prompt" positions are not scored
    return ids, mask, loss_mask


def check_adapter_export_against_peft(tmp_path, make, vocab, **lora_kw):
    """Trains LoRA (DoRA with use_dora=True) on the base that ``make()`` builds (a PyTorch
    model, seeded here so two calls build the same one): our merged export ``hf`` equals PEFT's
    base + our ``adapter``, loaded by transformers and PEFT, and the adapters moved it. Returns
    (the run's workdir, PEFT's model)."""
    import peft
    import torch
    import transformers
    from dpo_jax import trainer
    from test_tuning import lora_config
    torch.manual_seed(0)
    base = make()
    base.save_pretrained(tmp_path / "base")
    wd = tmp_path / "wd"
    trainer.train_and_evaluate(lora_config(tmp_path, tmp_path / "base", **lora_kw), wd)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        wd / "hf", attn_implementation="eager").eval()
    torch.manual_seed(0)
    with_adapter = peft.PeftModel.from_pretrained(make(), wd / "adapter").eval()
    ids = np.random.default_rng(0).integers(0, vocab, (3, 20))
    mask = np.ones_like(ids)
    mask[1, 14:] = 0
    a, b = torch_logits(merged, ids, mask), torch_logits(with_adapter, ids, mask)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert np.abs(a - torch_logits(base, ids, mask)).max() > 1e-3  # the adapters did move
    return wd, with_adapter
