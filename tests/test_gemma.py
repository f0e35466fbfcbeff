"""Issue 27: the Gemma family (gemma2, gemma3_text) against transformers' PyTorch models on the
same weights: logits with right and left padding past the sliding window, completion
log-probs, export round trip, KV-cache sampling past the window, and the fields the module
refuses."""

import json

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
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=64, rms_norm_eps=1e-5,
            query_pre_attn_scalar=20, sliding_window=8, bos_token_id=0, eos_token_id=1,
            pad_token_id=0)
VARIANTS = {
    # both soft-caps (small, so they bite), alternating local / global layers
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=4, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0)),
    # 5 local : 1 global, q/k norms, two RoPE bases, linear scaling on the global layers
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}


def make_torch(variant, seed=0):
    cls, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**BASE, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return perturb_norms_and_biases(model.eval(), scale=0.1)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, torch model, folder written by save_pretrained)."""
    model = make_torch(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_logits_match_transformers_past_the_window_with_right_and_left_padding(variant):
    name, tmodel, path = variant
    model = load_pretrained(path)
    assert model.config.windowed and model.config.sliding_window < 40
    ids, mask, _ = padded_batch(np.random.default_rng(0), VOCAB, t=40)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(tmodel, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("chunk_size", [7])  # (chunking itself: test_llama's, 0 and 7)
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
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    assert not info["mismatched_keys"], (name, info)
    assert type(back) is type(tmodel)
    ids, mask, _ = padded_batch(np.random.default_rng(2), VOCAB, t=40)
    np.testing.assert_allclose(torch_logits(back.eval(), ids, mask),
                               torch_logits(tmodel, ids, mask), atol=1e-5, rtol=0)
    for k, v in load_pretrained(tmp_path / "export").config.__dict__.items():
        assert getattr(load_pretrained(path).config, k) == v, k


def test_kv_cache_sampling_past_the_window_matches_full_recompute(variant):
    name, _, path = variant
    model = load_pretrained(path)
    ids, mask = sampling.left_pad([[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10]], 0)
    cfg = sampling.SamplingConfig(max_new_tokens=14)  # 8 + 14 tokens: past the window of 8
    np.testing.assert_array_equal(sampling.generate(model, ids, mask, cfg),
                                  sampling.generate(model, ids, mask, cfg, use_cache=False),
                                  err_msg=name)


def test_bfloat16_compute_stays_close(variant):
    name, _, path = variant
    ids, mask, loss_mask = padded_batch(np.random.default_rng(6), VOCAB, t=40)
    f32, n = sequence_logprobs(load_pretrained(path), ids, mask, loss_mask)
    bf16, _ = sequence_logprobs(load_pretrained(path, dtype="bfloat16"), ids, mask, loss_mask)
    per_token = np.abs(np.asarray(bf16) - np.asarray(f32)) / np.asarray(n)
    assert per_token.max() < 5e-3, (name, per_token)


def test_a_multimodal_gemma3_trains_its_language_model(tmp_path):
    """model_type gemma3 (vision + text): its text_config and language-model tensors load, and
    text-only logits equal the multimodal model's; the export is a text-only Gemma 3."""
    cls, kw = VARIANTS["gemma3"]
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(**{**BASE, **kw})
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                                    image_token_index=VOCAB - 1)
    tmodel = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    perturb_norms_and_biases(tmodel, scale=0.1)
    tmodel.save_pretrained(tmp_path / "mm")
    model = load_pretrained(tmp_path / "mm")
    assert model.config.model_type == "gemma3_text" and model.config.qk_norm
    ids, mask, _ = padded_batch(np.random.default_rng(3), VOCAB - 3, t=40)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(tmodel, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    save_pretrained(model, tmp_path / "text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    assert type(back).__name__ == "Gemma3ForCausalLM"


@pytest.mark.parametrize("change, message", [
    (dict(hidden_activation="relu"), "hidden_activation='relu' is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    (dict(layer_types=["chunked_attention"] * 4), "layer_types holds ['chunked_attention']"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_type='yarn'"),
])
def test_fields_the_module_does_not_implement_are_errors_naming_them(tmp_path, change, message):
    cfg = json.loads((make_config_dir(tmp_path) / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=None) as e:
        load_pretrained(tmp_path / "m")
    assert message in str(e.value), str(e.value)


def make_config_dir(tmp_path):
    model = make_torch("gemma2")
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_and_dora_exports_equal_peft_on_the_base(tmp_path, dora):
    """A LoRA / DoRA run on a Gemma 3 base (its window shorter than the pairs): the merged
    export equals PEFT's base + adapter, loaded by PEFT and transformers."""
    pytest.importorskip("peft")
    from parity import check_adapter_export_against_peft
    cls, kw = VARIANTS["gemma3"]
    cfg = getattr(transformers, cls)(**{**BASE, **kw, "vocab_size": 512, "num_hidden_layers": 2,
                                        "layer_types": ["sliding_attention", "full_attention"]})
    make = lambda: perturb_norms_and_biases(transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager").eval(), scale=0.1)
    check_adapter_export_against_peft(tmp_path, make, 512, use_dora=dora)


def test_sampling_stops_at_the_end_of_turn_the_model_config_lists(variant):
    """An instruct Gemma lists <end_of_turn> in its config's eos_token_id beside the tokenizer's
    <eos>: a completion stops at either (sampling.stop_ids)."""
    import types
    name, _, path = variant
    model = load_pretrained(path)
    ids, mask = sampling.left_pad([[5, 6, 7, 8, 9], [3, 4]], 0)
    free = sampling.generate(model, ids, mask, sampling.SamplingConfig(max_new_tokens=6))
    row = free[0].tolist()
    j = next((k for k in range(1, 6) if row[k] not in row[:k] and row[k] != 1), 0)
    turn = row[j]  # pretend this greedy token of row 0 is <end_of_turn>
    stops = sampling.stop_ids(types.SimpleNamespace(eos_token_id=(1, turn)),
                              types.SimpleNamespace(eos_token_id=1))
    assert stops == ((1, turn) if turn != 1 else (1,))
    out = sampling.generate(model, ids, mask, sampling.SamplingConfig(max_new_tokens=6,
                                                                      eos_id=stops))
    assert out[0, :j + 1].tolist() == row[:j + 1] and set(out[0, j + 1:]) <= {stops[0]}


# (splash's lengths form is the same kernel call as its segments form)
@pytest.mark.parametrize("impl, form", [("splash", "segments"), ("tiled", "lengths"),
                                        ("tiled", "segments")])
def test_the_kernels_take_the_window_and_the_soft_cap(impl, form, monkeypatch):
    """Splash (Pallas, interpreted on the CPU) with its local mask and logit cap on Gemma's
    local layers and its causal one on the global layers, and ``tiled`` attention (tiles of 16
    queries x 24 keys here, each tile's mask from the per-layer rule, the tiles out of the
    window skipped): the XLA path's hidden states (1e-5) and gradients (1e-5 of each leaf's
    scale), over rows and packed segments longer than the window."""
    import dataclasses

    import jax
    from flax import nnx

    from dpo_jax.models import attention, common
    from dpo_jax.models.attention import Mask
    from dpo_jax.models.gemma import Gemma, GemmaConfig
    cfg = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=256, query_pre_attn_scalar=16.0, sliding_window=9,
                      local_layers=(True, False), attn_logit_softcapping=4.0)
    t = 128
    ids = jax.random.randint(jax.random.key(0), (2, t), 1, 64)
    attn = (jnp.arange(t)[None] < jnp.array([t, 77])[:, None]).astype(jnp.int32)
    if form == "lengths":
        mask, pos = Mask.causal_padded(attn), None
    else:  # two packed sequences per row, positions restarting
        seg = jnp.where(jnp.arange(t)[None] < jnp.array([50, 30])[:, None], 0, 1)
        seg = jnp.where(attn.astype(bool), seg, -1)
        mask = Mask.segments(seg, attn)
        starts = jnp.where(seg == 1, jnp.array([50, 30])[:, None], 0)
        pos = jnp.maximum(jnp.arange(t)[None] - starts, 0)
    params = common.params_of(Gemma(cfg, rngs=nnx.Rngs(0)))

    def run(impl):
        gd = nnx.graphdef(common.abstract(Gemma, dataclasses.replace(cfg, attention=impl)))

        def f(p):
            h = nnx.merge(gd, p).hidden_states(ids, attn, pos, attn_mask=mask)
            return (h * attn[..., None]).sum(), h * attn[..., None]
        return jax.value_and_grad(f, has_aux=True)(params)

    monkeypatch.setattr(attention, "RING_TILE", 16)
    monkeypatch.setattr(attention, "RING_KEY_TILE", 24)
    (_, want), gw = run("xla")
    (_, got), gg = run(impl)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gg)):  # 1e-5 of each leaf's scale
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max())


def test_the_kernel_choice_follows_what_each_kernel_takes():
    """Splash takes windows and soft-caps; cuDNN takes a window (in its mask bias) but no cap:
    Gemma 2 on a GPU runs XLA and says why, an explicit cudnn is an error naming the cap."""
    from dpo_jax.models import attention
    kw = dict(dtype="bfloat16", head_dim=128, mask_forms={"lengths"}, lengths=(512,))
    gemma3, gemma2 = ("a sliding window",), ("a sliding window", "soft-capped logits")
    assert attention.resolve("auto", platform="gpu", model_needs=gemma3, **kw)[0] == "cudnn"
    impl, why = attention.resolve("auto", platform="gpu", model_needs=gemma2, **kw)
    assert impl == "xla" and "cudnn does not soft-cap attention logits" in why
    with pytest.raises(ValueError, match="cudnn does not soft-cap"):
        attention.resolve("cudnn", platform="gpu", model_needs=gemma2, **kw)
    impl, why = attention.resolve("auto", platform="tpu", model_needs=gemma2, **kw)
    assert impl == "splash" and "soft-capped logits in the kernel" in why
