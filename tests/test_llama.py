"""Issue 15: the Llama family (llama, mistral, qwen2, qwen3) against transformers' PyTorch models
on the same weights: logits, completion log-probs, export round trip, bf16 and sharded
checkpoints, KV-cache sampling with GQA, and the fields the module refuses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the numerical reference for parity tests")
transformers = pytest.importorskip("transformers")

from parity import padded_batch, perturb_norms_and_biases, torch_logits, torch_sequence_logprobs  # noqa: E402,E501
from dpo_jax import sampling  # noqa: E402
from dpo_jax.hf import CheckpointError, load_pretrained, save_pretrained  # noqa: E402
from dpo_jax.logprobs import sequence_logprobs  # noqa: E402

VOCAB = 320
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
# One tiny model per variant the family must get right.
VARIANTS = {
    # GQA (4 query heads on 2 KV heads), an untied head, Llama 3.1/3.2's rope scaling with an
    # original context short enough that every frequency band is exercised
    "llama-gqa-llama3": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    # SmolLM2-like: a tied head, multi-query attention, linear rope scaling
    "llama-tied-mqa": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen2-biases": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)),
    # Qwen3: q/k norms, and a head_dim that is not hidden / heads (as Qwen3-0.6B: 128 vs 64)
    "qwen3-qknorm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                      sliding_window=4096, tie_word_embeddings=False)),
    # Phi-4-mini's shape of Phi-3: fused qkv_proj / gate_up_proj, RoPE on 3/4 of each head,
    # longrope (short factors below the original length, the attention factor), a tied head
    "phi3": ("Phi3Config", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0,
        max_position_embeddings=96, original_max_position_embeddings=48,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                         "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]})),
}


def make_torch(variant, seed=0):
    cls, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return perturb_norms_and_biases(model, scale=0.1)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, torch model, folder written by save_pretrained)."""
    model = make_torch(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_logits_match_transformers_with_right_and_left_padding(variant):
    name, tmodel, path = variant
    model = load_pretrained(path)
    ids, mask, _ = padded_batch(np.random.default_rng(0), VOCAB, t=40)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(tmodel, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_completion_logprobs_match_transformers(variant, chunk_size):
    name, tmodel, path = variant
    model = load_pretrained(path)
    ids, mask, loss_mask = padded_batch(np.random.default_rng(1), VOCAB, t=40)
    logps, n = sequence_logprobs(model, ids, mask, loss_mask, chunk_size=chunk_size)
    ref, ref_n = torch_sequence_logprobs(tmodel, ids, mask, loss_mask)
    np.testing.assert_allclose(np.asarray(logps), ref, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(n), ref_n)


def test_export_round_trip_loads_in_transformers(variant, tmp_path):
    name, tmodel, path = variant
    save_pretrained(load_pretrained(path), tmp_path / "export")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export",
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    assert not info["mismatched_keys"], (name, info)
    assert type(back) is type(tmodel)
    ids, mask, _ = padded_batch(np.random.default_rng(2), VOCAB, t=40)
    np.testing.assert_allclose(torch_logits(back.eval(), ids, mask),
                               torch_logits(tmodel, ids, mask), atol=1e-5, rtol=0)


def test_bfloat16_and_sharded_checkpoints_load_into_float32(variant, tmp_path):
    """Qwen and Llama ship bfloat16 safetensors, often sharded with an index."""
    name, tmodel, _ = variant
    bf16 = tmodel.to(torch.bfloat16)
    try:
        bf16.save_pretrained(tmp_path / "bf16", max_shard_size="60KB")
    finally:
        tmodel.to(torch.float32)
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    model = load_pretrained(tmp_path / "bf16")
    leaves = jax.tree.leaves(jax.tree.map(lambda a: a, __import__("dpo_jax").hf.model_params(
        model)))
    assert all(a.dtype == jnp.float32 for a in leaves)
    want = {k: v.float().numpy() for k, v in bf16.state_dict().items()}
    got = __import__("dpo_jax").hf.hf_state_dict(model.config,
                                                 __import__("dpo_jax").hf.model_params(model))
    for k, v in got.items():  # every tensor is the bf16 value, exactly
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_kv_cache_sampling_with_gqa_matches_full_recompute(variant):
    name, _, path = variant
    model = load_pretrained(path)
    ids, mask = sampling.left_pad([[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10]], 0)
    for eos in (None, 7):
        cfg = sampling.SamplingConfig(max_new_tokens=10, eos_id=eos)
        np.testing.assert_array_equal(sampling.generate(model, ids, mask, cfg),
                                      sampling.generate(model, ids, mask, cfg, use_cache=False),
                                      err_msg=name)


def test_bfloat16_compute_stays_close(variant):
    """Documented bf16 tolerance (README), the same bound as GPT-2's: < 5e-3 nats per scored
    token and 1e-3 relative (measured: at most 6.6e-4 nats/token, 1.1e-4 relative)."""
    name, _, path = variant
    ids, mask, loss_mask = padded_batch(np.random.default_rng(6), VOCAB, t=40)
    f32, n = sequence_logprobs(load_pretrained(path), ids, mask, loss_mask)
    bf16, _ = sequence_logprobs(load_pretrained(path, dtype="bfloat16"), ids, mask, loss_mask)
    per_token = np.abs(np.asarray(bf16) - np.asarray(f32)) / np.asarray(n)
    assert per_token.max() < 5e-3, (name, per_token)
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), rtol=1e-3, err_msg=name)


# ---------------------------------------------------------------------------- refused fields

@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_type='yarn'"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    # both fields, disagreeing: transformers 5 reads the legacy one (issue 25)
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     r"rope_parameters says rope_type='default' and the legacy rope_scaling says 'llama3'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
      "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
])
def test_fields_the_module_does_not_implement_are_errors_naming_them(tmp_path, change, message):
    make_torch("mistral").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path)


def test_a_sliding_window_is_a_length_limit_naming_the_field():
    from dpo_jax.models.llama.params import config_from_hf
    cfg = config_from_hf({"model_type": "mistral", "sliding_window": 32,
                          "max_position_embeddings": 128, "hidden_size": 64,
                          "num_attention_heads": 4})
    assert cfg.length_limits() == {"max_position_embeddings": 128, "sliding_window": 32}
    qwen = config_from_hf({"model_type": "qwen2", "use_sliding_window": False,
                           "sliding_window": 32, "hidden_size": 64, "num_attention_heads": 4})
    assert qwen.sliding_window is None  # Qwen's window applies only with use_sliding_window


@pytest.mark.parametrize("config", ["configs/qwen3.py", "configs/smollm2.py",
                                    "configs/gemma3_1b.py", "configs/phi4_mini.py",
                                    "configs/qwen3_moe.py"])
def test_hub_configs_fail_at_once_offline(config, tmp_path):
    """The real-model configs name their hub ids; offline they stop in seconds, saying what."""
    import subprocess
    import sys
    import time
    from trainutil import CLI_ENV, REPO
    run = lambda *extra: subprocess.run(
        [sys.executable, "train.py", "--config", config, "--workdir", str(tmp_path / "wd"),
         *extra], cwd=REPO, capture_output=True, text=True,
        env={**CLI_ENV, "HF_HUB_OFFLINE": "1"}, timeout=120)
    t0 = time.time()
    # a pod config's mesh (Qwen3-MoE's expert axis of 8) first needs its devices
    r = run(*(["--config.mesh_expert=1"] if config == "configs/qwen3_moe.py" else []))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cannot be reached (offline)" in r.stderr.splitlines()[-1]
    assert time.time() - t0 < 30
    if config == "configs/qwen3_moe.py":
        r = run()
        assert "needs 8 devices" in r.stderr or "do not divide by 8" in r.stderr, r.stderr
        assert "config keys mesh_data" in r.stderr.splitlines()[-1]
