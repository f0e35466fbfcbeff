"""Tuning methods (dpo_jax/tuning/). LoRA (issue 16) and DoRA (issue 24): adapters train, the
frozen base (adapters off) is the reference; exports merged and in PEFT's format, each equal to
PEFT's own model; a PEFT adapter can start a run; a changed base is refused. A toy method
registered from this file trains through the trainer with no edit to the package."""

import json
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the numerical reference for parity tests")
transformers = pytest.importorskip("transformers")

from parity import perturb_norms_and_biases, torch_logits  # noqa: E402
from trainutil import tiny_config  # noqa: E402
from dpo_jax import checkpoint, models, sharding, trainer, tuning  # noqa: E402
from dpo_jax.tuning import lora  # noqa: E402
from dpo_jax.errors import ConfigError  # noqa: E402

VOCAB = 512  # the shipped tokenizer's (data/tiny)


def torch_base(family: str, seed=0, width=64):
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=width, n_layer=2,
                                      n_head=4, bos_token_id=0, eos_token_id=0)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=width,
                                       intermediate_size=2 * width,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=128,
                                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return perturb_norms_and_biases(model)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base(request, tmp_path_factory):
    """(family, torch model, folder written by save_pretrained)."""
    model = torch_base(request.param)
    path = tmp_path_factory.mktemp(f"base_{request.param}")
    model.save_pretrained(path)
    return request.param, model, path


def lora_config(tmp_path, base_path, **overrides):
    kw = dict(model_name_or_path=str(base_path), lora_rank=4, lora_alpha=8.0,
              learning_rate=1e-2, warmup_steps=0, lr_scheduler_type="constant", max_steps=4,
              logging_steps=1, eval_steps=0, save_steps=2, sample_prompts=0)
    kw.update(overrides)
    return tiny_config(tmp_path, **kw)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_step_zero_is_the_reference_and_the_base_never_moves(base, tmp_path, dora):
    family, _, path = base
    run = trainer.setup(lora_config(tmp_path, path, lora_dropout=0.1, use_dora=dora),
                        tmp_path / "wd")
    assert run.tuning.name == ("dora" if dora else "lora")
    frozen0 = jax.tree.map(np.array, run.frozen)
    adapters0 = jax.tree.map(np.array, run.state["params"])
    assert all(not b.any() for k, b in models.flatten(adapters0).items() if k.endswith("lora_b"))
    batch = run.batch
    for step in range(4):
        run.state, m = run.train_step(run.state, run.frozen,
                                      sharding.shard_batch(run.mesh, batch))
        batch = run.next_update()
        if step == 0:  # B = 0: the policy is the base, which is the reference. Up to float32
            # rounding: XLA compiles the policy (with the adapter's extra matmul on the same
            # input) apart from the reference (measured: exact for GPT-2, 1 ulp for Llama)
            assert abs(float(m["loss"]) - math.log(2)) < 1e-6, float(m["loss"])
            for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
                assert abs(float(m[k])) < 1e-5, (k, float(m[k]))
    for k, v in models.flatten(jax.tree.map(np.array, run.frozen)).items():
        np.testing.assert_array_equal(v, models.flatten(frozen0)[k], err_msg=k)  # bitwise
    moved = models.flatten(jax.tree.map(np.array, run.state["params"]))
    assert all(np.abs(v - models.flatten(adapters0)[k]).max() > 0 for k, v in moved.items())
    run.ckpt.close()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_export_equals_peft_base_plus_adapter(base, tmp_path, dora):
    pytest.importorskip("peft")
    from parity import check_adapter_export_against_peft
    family, _, path = base
    wd, with_adapter = check_adapter_export_against_peft(tmp_path, lambda: torch_base(family),
                                                         VOCAB, use_dora=dora)
    cfg = json.loads((wd / "adapter" / lora.PEFT_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    assert cfg["use_dora"] is dora
    if dora:  # PEFT's DoRA layer is what loaded, and its magnitudes moved off ||W||
        layers = [m for m in with_adapter.modules() if hasattr(m, "lora_magnitude_vector")]
        assert layers and all(l.use_dora["default"] for l in layers)
        run = trainer.setup(lora_config(tmp_path, path, use_dora=True), tmp_path / "again")
        mags = {k: v for k, v in models.flatten(run.state["params"]).items()
                if k.endswith("lora_magnitude")}
        assert len(mags) == len(run.tuning.paths)  # one per adapted matrix
        run.ckpt.close()


def test_lora_dropout_draws_its_own_mask_in_each_mlp_tile():
    """In the MLP's tiles (``common.feed_forward``, config key ``mlp``) LoRA dropout folds the
    tile's number into the layer's key: four tiles of a row draw four masks (one key would
    draw the same mask four times), at the rate asked; outside a tile the layer's own key."""
    import jax.numpy as jnp
    from flax import nnx
    from dpo_jax.models import common
    width = 8
    zero = common.Linear(width, width, std=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0), bias=False)
    cfg = lora.LoRAConfig(rank=width, alpha=width, dropout=0.5, target="")
    layer = lora.LoRALinear(zero, cfg, jnp.eye(width), jnp.eye(width), dropout=True)
    layer.lora_key[...] = jax.random.key_data(jax.random.key(3))
    x = jnp.ones((1, 16, width))
    whole = np.asarray(layer(x))  # W = 0, A B = I: the output is the dropped-out input
    tiles = np.asarray(common.feed_forward(layer, x, 4))[0].reshape(4, 4 * width)
    assert set(np.unique(tiles)) == {0.0, 2.0}  # kept inputs scaled by 1 / (1 - 0.5)
    assert len({row.tobytes() for row in tiles != 0}) == 4  # a mask per tile
    assert 0.3 < (tiles != 0).mean() < 0.7
    np.testing.assert_array_equal(np.asarray(layer(x)), whole)
    np.testing.assert_array_equal(np.asarray(common.feed_forward(layer, x, 16)), whole)  # 1 tile


def test_the_reference_costs_no_memory(base, tmp_path):
    """Live buffers of the embedding's shape that setup creates: with LoRA one per such base
    tensor, the base (frozen, and also the reference); with full tuning four: the policy, its
    reference and Adam's two moments."""
    family, _, path = base
    emb = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    params = dict(torch_base(family).named_parameters())  # a tied head counted once
    shape = tuple(params[emb].shape)
    k = sum(tuple(v.shape) == shape for v in params.values())  # Llama's untied head: 2

    def count():
        import gc
        gc.collect()
        return sum(tuple(a.shape) == shape for a in jax.live_arrays())

    def copies(**kw):
        before = count()
        run = trainer.setup(lora_config(tmp_path, path, **kw), tmp_path / f"wd{len(kw)}")
        n = count() - before
        run.ckpt.close()
        del run
        return n

    assert copies(lora_rank=0) == 4 * k
    assert copies() == k


def test_a_target_that_matches_nothing_names_what_could_match(base, tmp_path):
    family, _, path = base
    with pytest.raises(ConfigError, match=r"lora_target='attn_q' matches no matrix of this "
                                          r"model; its matrices are: .*\.c_proj|.*_proj") as e:
        trainer.setup(lora_config(tmp_path, path, lora_target="attn_q"), tmp_path / "wd")
    assert "\n" not in str(e.value)  # one line


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_peft_adapter_starts_a_run_and_a_changed_base_is_refused(base, tmp_path, dora):
    family, _, path = base
    if (family == "llama") != dora:  # suite time: each family once and each method once
        pytest.skip("GPT-2 starts from a LoRA adapter, the Llama family from a DoRA one")
    first = tmp_path / "first"
    trainer.train_and_evaluate(lora_config(tmp_path, path, use_dora=dora), first)
    run = trainer.setup(lora_config(tmp_path, path, use_dora=dora,
                                    lora_init=str(first / "adapter")), tmp_path / "second")
    ck = checkpoint.Checkpointer(first / "checkpoints", async_save=False)
    trained = ck.restore_params(4, checkpoint.abstract_like(run.state["params"]))
    for k, v in models.flatten(jax.tree.map(np.array, run.state["params"])).items():
        np.testing.assert_allclose(v, np.asarray(models.flatten(trained)[k]), atol=1e-7,
                                   err_msg=k)  # started from the adapter
    run.ckpt.close()
    other = tmp_path / "other_base"
    torch_base(family, seed=1).save_pretrained(other)  # the same shapes, other weights
    with pytest.raises(checkpoint.CheckpointMismatch, match="adapters of another base model"):
        trainer.train_and_evaluate(lora_config(tmp_path, other, max_steps=6, use_dora=dora),
                                   first)
    with pytest.raises(ConfigError, match=r"made with lora_rank=4; this run has lora_rank=8"):
        trainer.setup(lora_config(tmp_path, path, lora_rank=8, use_dora=dora,
                                  lora_init=str(first / "adapter")), tmp_path / "third")
    kind = "DoRA" if dora else "LoRA"
    with pytest.raises(ConfigError, match=f"a {kind} adapter, and this run trains"):
        trainer.setup(lora_config(tmp_path, path, use_dora=not dora,
                                  lora_init=str(first / "adapter")), tmp_path / "fourth")
    with pytest.raises(checkpoint.CheckpointMismatch, match=f"holds {kind.upper()} adapters"):
        trainer.setup(lora_config(tmp_path, path, use_dora=not dora, max_steps=6), first)


def test_a_bad_adapter_folder_is_one_line(base, tmp_path):
    """A corrupt adapter_config.json, or an adapter of the right rank for another width."""
    family, _, path = base
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / lora.PEFT_CONFIG).write_text("{not json")
    with pytest.raises(ConfigError, match="not a PEFT adapter config") as e:
        trainer.setup(lora_config(tmp_path, path, lora_init=str(bad)), tmp_path / "wd")
    assert "\n" not in str(e.value)
    first = tmp_path / "first"
    trainer.train_and_evaluate(lora_config(tmp_path, path, max_steps=1), first)
    wide = tmp_path / "wide_base"  # the same family and rank, another width
    torch_base(family, width=32).save_pretrained(wide)
    with pytest.raises(ConfigError, match=r"where this model's .* is \(") as e:
        trainer.setup(lora_config(tmp_path, wide, lora_init=str(first / "adapter")),
                      tmp_path / "wd2")
    assert "\n" not in str(e.value)


class ScaledHead(tuning.Tuning):
    """A toy method: only the final norm's scale trains; the rest is frozen and, with the
    trained scale reset to its initial value, the reference."""

    name = "toy_norm_only"

    def __init__(self, family, model_cfg, ref_dtype=""):
        super().__init__(family, model_cfg, ref_dtype)
        from flax import nnx
        from dpo_jax.models import common
        self.graphdef = nnx.graphdef(common.abstract(family.model_cls, model_cfg))
        self.key = "ln_f" if family.name == "gpt2" else "norm"

    @classmethod
    def applies(cls, config):
        return config.lora_target == "toy"  # this test's switch

    def model(self, trainable, frozen, rng=None):
        from flax import nnx
        return nnx.merge(self.graphdef, {**frozen["base"], self.key: trainable})

    def reference(self, trainable, frozen):
        from flax import nnx
        return nnx.merge(self.graphdef, frozen["base"])

    def split(self, mesh, params, *, seed):
        from jax.sharding import PartitionSpec as P
        params = sharding.place(params, sharding.named(
            mesh, sharding.param_specs(params, self.family.rules)))
        trainable = params[self.key]
        return tuning.Parts(trainable, ((r".*", P()),), jax.tree.map(lambda _: False, trainable),
                            {"base": params})

    def merged_params(self, trainable, frozen):
        base = jax.tree.map(np.asarray, frozen["base"])
        return {**base, self.key: trainable}

    def trainable_template(self, base_params):
        return base_params[self.key]


def test_a_tuning_method_registered_from_outside_trains(base, tmp_path):
    """No package file names the toy: registering it is all it takes (the README's map says
    where a method goes)."""
    family, tmodel, path = base
    tuning.register(ScaledHead)
    try:
        wd = tmp_path / "wd"
        cfg = lora_config(tmp_path, path, lora_rank=0, lora_target="toy", learning_rate=1e-1)
        summary = trainer.train_and_evaluate(cfg, wd)
        assert summary["steps"] == 4
        record = checkpoint.Checkpointer(wd / "checkpoints", async_save=False).record(4)
        assert record["tuning"] is None
        exported = transformers.AutoModelForCausalLM.from_pretrained(wd / "hf")
        theirs, ours = dict(tmodel.named_parameters()), dict(exported.named_parameters())
        moved = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert moved and all(("ln_f" in k) or ("model.norm" in k) for k in moved), moved
    finally:
        tuning.unregister("toy_norm_only")
    assert tuning.method_for(cfg).name == "full"
