"""Issue 26, goodput: the trainer's model FLOPs (from the model contract) agree with
bench/step_speed.py's analytic count on the same shapes, and a run logs MFU, model TFLOP/s
and where its wall time went, per logged step and in its summary."""

import json
import sys

import pytest

from trainutil import REPO, tiny_config
from dpo_jax import goodput, trainer
from dpo_jax.hf import config_from_hf

sys.path.insert(0, str(REPO / "bench"))
import step_speed as bench  # noqa: E402

GPT2 = dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
            n_positions=1024)
QWEN3 = dict(model_type="qwen3", num_hidden_layers=28, hidden_size=1024, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
             tie_word_embeddings=True)


@pytest.mark.parametrize("hf, shape", [(GPT2, "gpt2"), (QWEN3, "qwen3-0.6b")])
@pytest.mark.parametrize("mode", ["plain", "head", "prefix", "precomputed"])
@pytest.mark.parametrize("lora", [False, True])
def test_model_flops_agree_with_the_bench(hf, shape, mode, lora):
    cfg = config_from_hf(hf, source="test")
    p, c, n = bench.PROMPT, bench.COMPLETION, bench.PAIRS
    rows, seq, heads = {"plain": (2 * n, p + c, 2 * n * (p + c)),
                        "head": (2 * n, p + c, 2 * n * c)}.get(mode, (n, p + 2 * c, 2 * n * c))
    passes = (2 if lora else 3) + (mode != "precomputed")
    ours = passes * goodput.forward_flops(cfg, rows, seq, heads)
    theirs = bench.mode_flops(mode, bench.SHAPES[shape], lora)
    assert abs(ours / theirs - 1) < 0.05, (ours, theirs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_run_logs_mfu_and_its_time_shares(tmp_path, family):
    from configs import tiny_llama
    kw = dict(model=tiny_llama.get_config().model.to_dict()) if family == "llama" else {}
    c = tiny_config(tmp_path, max_steps=4, warmup_steps=1, logging_steps=2, eval_steps=0,
                    sample_prompts=0,
                    peak_tflops=0.5, **kw)
    run = trainer.setup(c, tmp_path / "wd")
    m = run.model_cfg
    shape = bench.Shape(family, m.n_layers, run.model_cfg.n_heads * m.head_size, m.n_heads,
                        m.n_kv_heads, m.head_size,
                        getattr(m, "intermediate_size", None) or m.d_ff, m.vocab_size,
                        family == "llama")
    ids = run.batch["input_ids"]
    heads = run.batch["score_pos"].size if "score_pos" in run.batch else ids.size
    want = 4 * bench.model_flops(shape, ids.size // ids.shape[-1], ids.shape[-1], heads)
    assert abs(run.step_flops() / want - 1) < 0.05, (run.step_flops(), want)
    run.ckpt.close()
    if family != "gpt2":  # the logging below is the trainer's, whatever the family
        return
    summary = trainer.train_and_evaluate(c, tmp_path / "wd2")
    rows = [json.loads(x) for x in (tmp_path / "wd2" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    import jax  # MFU is against the peak of every device (the 8 simulated ones here)
    assert last["train/mfu"] == pytest.approx(
        last["train/model_tflops_per_sec"] / (0.5 * jax.device_count()), rel=1e-6)
    shares = [last[f"goodput/{k}_share"] for k in ("step", "data", "eval", "checkpoint")]
    assert all(0 <= x <= 1 for x in shares) and sum(shares) == pytest.approx(1, abs=1e-6)
    g = summary["goodput"]
    assert g["wall_s"] > 0 and 0 < g["step_share"] <= 1 and g["mfu"] == last["train/mfu"]
