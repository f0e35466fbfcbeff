"""Issue 28: the mixture-of-experts family (qwen3_moe, with and without a dense layer, mixtral,
olmoe) against transformers' PyTorch models on the same weights: logits with right and left padding, completion
log-probs, export round trip, KV-cache sampling, and the router's load-balancing loss against
transformers' ``load_balancing_loss_func``."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the numerical reference for parity tests")
transformers = pytest.importorskip("transformers")

from parity import padded_batch, perturb_norms_and_biases, torch_logits, torch_sequence_logprobs  # noqa: E402,E501
from dpo_jax import sampling  # noqa: E402
from dpo_jax.hf import load_pretrained, save_pretrained  # noqa: E402
from dpo_jax.logprobs import sequence_logprobs  # noqa: E402
from dpo_jax.models.moe.aux import load_balancing_loss  # noqa: E402

VOCAB = 320
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
VARIANTS = {  # 4-8 experts, top-2; routing is uneven at random init
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=40, head_dim=16,
                                         norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                      intermediate_size=40)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=40)),
    # a dense layer between two sparse ones (mlp_only_layers): two stacks, run in HF order
    "qwen3_moe_dense": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=40, head_dim=16,
                                               norm_topk_prob=True, num_hidden_layers=3,
                                               mlp_only_layers=[1], intermediate_size=56)),
}


def make_torch(variant, seed=0):
    cls, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return perturb_norms_and_biases(model.eval(), scale=0.1)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    model = make_torch(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_logits_and_logprobs_match_transformers(variant):
    name, tmodel, path = variant
    model = load_pretrained(path)
    ids, mask, loss_mask = padded_batch(np.random.default_rng(0), VOCAB, t=40)
    ref = torch_logits(tmodel, ids, mask)
    real = mask.astype(bool)
    for kernel in ("scan", "ragged_dot"):  # the tiled kernel, and XLA's grouped matmul; with
        # the second, the MLP in tiles of 16 positions (the dense layer's; the experts' whole)
        tile = 16 if kernel == "ragged_dot" else 0
        ours = np.asarray(load_pretrained(path, experts_kernel=kernel, mlp_tile=tile)(
            jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0,
                                   err_msg=f"{name} {kernel}")
    logps, _ = sequence_logprobs(model, ids, mask, loss_mask, chunk_size=7)
    want, _ = torch_sequence_logprobs(tmodel, ids, mask, loss_mask)
    np.testing.assert_allclose(np.asarray(logps), want, rtol=1e-5, err_msg=name)


def test_export_round_trip_loads_in_transformers(variant, tmp_path):
    name, tmodel, path = variant
    save_pretrained(load_pretrained(path), tmp_path / "export")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    assert type(back) is type(tmodel)
    ids, mask, _ = padded_batch(np.random.default_rng(2), VOCAB, t=24)
    np.testing.assert_allclose(torch_logits(back.eval(), ids, mask),
                               torch_logits(tmodel, ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sizes,tile", [([0, 7, 20, 0, 13], 8), ([10, 0, 0, 30], 16),
                                        ([3, 4, 5, 0], 128), ([0, 0, 0, 0], 8)])
def test_the_tiled_kernel_equals_ragged_dot(sizes, tile):
    """The ``scan`` kernel: tiles crossing group boundaries, empty groups, rows after the last
    group (zeros), a tile larger than the rows; values and all four gradients."""
    import jax
    from dpo_jax.models.moe.model import _tiled_swiglu, swiglu_experts
    rng = np.random.default_rng(0)
    e, c, f, m = len(sizes), 6, 5, 50
    x = jnp.asarray(rng.normal(size=(m, c)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(e, c, f), (e, c, f), (e, f, c)]]
    gs = jnp.asarray(sizes, jnp.int32)
    fns = (lambda *p: swiglu_experts(p[0], gs, *p[1:], "ragged_dot"),
           lambda *p: _tiled_swiglu(p[0], gs, *p[1:], tile=tile))
    want, got = (np.asarray(fn(x, *w)) for fn in fns)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-6)
    assert not got[sum(sizes):].any()
    grads = [jax.grad(lambda *p: jnp.sum(fn(*p) ** 2), argnums=(0, 1, 2, 3))(x, *w)
             for fn in fns]
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, float(jnp.abs(a).max())))


def test_kv_cache_sampling_matches_full_recompute(variant):
    name, _, path = variant
    if name not in ("qwen3_moe", "qwen3_moe_dense"):
        pytest.skip("one decode path for the three: checked on qwen3_moe (and its dense layer)")
    model = load_pretrained(path)
    ids, mask = sampling.left_pad([[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6]], 0)
    cfg = sampling.SamplingConfig(max_new_tokens=6)
    np.testing.assert_array_equal(sampling.generate(model, ids, mask, cfg),
                                  sampling.generate(model, ids, mask, cfg, use_cache=False),
                                  err_msg=name)


def test_the_load_balancing_loss_is_transformers(variant):
    name, tmodel, path = variant
    mod = __import__(type(tmodel).__module__, fromlist=["load_balancing_loss_func"])
    ids, mask, _ = padded_batch(np.random.default_rng(3), VOCAB, t=24)
    with torch.no_grad():
        out = tmodel(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     output_router_logits=True)
    cfg = tmodel.config
    experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    for m in (None, mask):
        want = float(mod.load_balancing_loss_func(
            out.router_logits, experts, cfg.num_experts_per_tok,
            None if m is None else torch.tensor(m)))
        got = float(load_balancing_loss(np.stack([r.numpy() for r in out.router_logits]),
                                        experts, cfg.num_experts_per_tok, m))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    # our model's own router logits, gathered out of its scanned stacks, give transformers'
    # aux_loss (the attention mask excluding padding); with the MLP in tiles too (the dense
    # layer's: the experts route whole rows)
    model = load_pretrained(path, mlp_tile=8)
    model(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(model.aux_loss()), float(out.aux_loss), rtol=1e-5,
                               err_msg=name)


def test_the_train_step_adds_the_router_loss_of_the_policy(tmp_path):
    """router_aux_loss_coef (TRL's name): the step's loss is the DPO loss + coef x the
    load-balancing loss of the policy's router over the chosen and rejected tokens (padding
    excluded), logged as aux_loss; its gradient reaches the routers. A model without a router
    refuses the key."""
    import jax

    from configs import tiny_moe
    from dpo_jax import sharding, trainer
    from dpo_jax.errors import ConfigError
    from trainutil import tiny_config
    kw = dict(model=tiny_moe.get_config().model.to_dict(), max_steps=2, warmup_steps=0,
              sample_prompts=0, layout="pair", max_completion_length=0)
    runs = [trainer.setup(tiny_config(tmp_path, router_aux_loss_coef=coef, **kw),
                          tmp_path / f"wd{coef}") for coef in (0.0, 0.5)]
    batch = sharding.shard_batch(runs[0].mesh, runs[0].batch)
    before = jax.tree.map(jnp.copy, runs[1].state["params"])  # (the step donates the state)
    (_, plain), (state, with_aux) = (r.train_step(r.state, r.frozen, batch) for r in runs)
    aux = float(with_aux["aux_loss"])
    assert 0.9 < aux < 2.5  # E * sum(f * p): 1 when perfectly balanced, up to E
    np.testing.assert_allclose(float(with_aux["loss"]), float(plain["loss"]) + 0.5 * aux,
                               rtol=1e-6)
    # the policy's router logits, recomputed outside the step, give the same aux loss
    model = runs[1].tuning.model(before, runs[1].frozen)
    b = jax.tree.map(lambda a: a[0], batch)
    model.hidden_states(b["input_ids"], b["attention_mask"])
    np.testing.assert_allclose(float(model.aux_loss()), aux, rtol=1e-6)
    for r in runs:
        r.ckpt.close()
    with pytest.raises(ConfigError, match="router_aux_loss_coef=0.1: this model .* has no router"):
        trainer.setup(tiny_config(tmp_path, router_aux_loss_coef=0.1), tmp_path / "gpt2")


def test_moe_kernel_is_resolved_for_experts_and_refused_without():
    from dpo_jax import plan
    from dpo_jax.errors import ConfigError
    from dpo_jax.models.llama import LlamaConfig
    from dpo_jax.models.moe import MoEConfig
    from dpo_jax.models.moe.model import resolve_kernel
    assert plan.experts_kernel("scan", MoEConfig()).experts_kernel == "scan"
    assert resolve_kernel("auto") == "scan"  # the CPU: ragged_dot would be a dense pass
    assert plan.experts_kernel("auto", LlamaConfig()) == LlamaConfig()
    with pytest.raises(ConfigError, match="config key moe_kernel=scan: this model "
                                          r"\(LlamaConfig\) has no experts"):
        plan.experts_kernel("scan", LlamaConfig())


def test_lora_on_a_model_with_a_dense_layer_exports_what_peft_loads(tmp_path):
    """LoRA on the attention of both stacks (sparse and dense layers): the adapter's PEFT keys
    name the HF layers, so PEFT's base + adapter equals our merged export."""
    pytest.importorskip("peft")
    from parity import check_adapter_export_against_peft
    cls, kw = VARIANTS["qwen3_moe_dense"]
    cfg = getattr(transformers, cls)(**{**BASE, **kw, "vocab_size": 512})
    make = lambda: perturb_norms_and_biases(transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager").eval(), scale=0.1)
    check_adapter_export_against_peft(tmp_path, make, 512)
