"""Issues 14 and 24: the model contract. A family registered from inside a test (its own names,
a fused, a transposed and a row-permuted tensor in its table) trains through the whole pipeline
and exports and imports exactly; checkpoints of the previous format are still read."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from trainutil import tiny_config
from dpo_jax import checkpoint, hf, models
from dpo_jax.models import HFTensor, common, gpt2
from dpo_jax.models.gpt2 import model as gpt2_model
from dpo_jax.trainer import train_and_evaluate


@dataclasses.dataclass(frozen=True)
class ToyConfig(gpt2.GPT2Config):
    """GPT-2 with its own config.json spelling (and squared-ReLU MLPs, registered below)."""

    final_logit_softcap: float = 0.0  # the output hook's soft-cap (trunk.CausalLM.logits_fn)


def toy_family():
    def from_hf(hf_cfg, **compute):
        return ToyConfig(vocab_size=hf_cfg["vocab"], n_positions=hf_cfg["context"],
                         n_embd=hf_cfg["width"], n_layer=hf_cfg["depth"], n_head=hf_cfg["heads"],
                         activation_function="squared_relu", bos_token_id=hf_cfg["bos_token_id"],
                         eos_token_id=hf_cfg["eos_token_id"], **compute)

    def to_hf(c):
        return {"model_type": "toy", "vocab": c.vocab_size, "context": c.n_positions,
                "width": c.n_embd, "depth": c.n_layer, "heads": c.n_head,
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}

    def tensors(c):  # its own names: "decoder.layers.{i}.<ours>", embeddings renamed; the
        # first norm's scale and bias fused into one tensor, the MLP's input matrix transposed
        names = models.flatten(common.params_of(common.abstract(gpt2.GPT2, c)))
        rename = {"wte.weight": "embed.tokens", "wpe.weight": "embed.positions"}
        fused = ("h.ln_1.weight", "h.ln_1.bias")
        reverse = lambda n: np.arange(n)[::-1]  # its positions stored last one first
        return [HFTensor(fused, "decoder.layers.{i}.ln_1.packed")] + [
            HFTensor(n, f"decoder.layers.{{i}}.{n[2:]}" if n.startswith("h.")
                     else rename.get(n, f"decoder.{n}"), transpose=n == "h.mlp.c_fc.weight",
                     row_order=reverse if n == "wpe.weight" else None)
            for n in names if n not in fused]

    return models.Family(name="toy", model_types=("toy",), config_cls=ToyConfig,
                         model_cls=gpt2.GPT2, config_from_hf=from_hf, config_to_hf=to_hf,
                         hf_tensors=tensors, rules=((r".*", P()),), lora_target=r"h\..*")


def test_a_family_registered_in_a_test_trains_one_step(tmp_path, monkeypatch):
    monkeypatch.setitem(gpt2_model.ACTIVATIONS, "squared_relu", lambda x: jax.nn.relu(x) ** 2)
    monkeypatch.setattr(models, "FAMILIES", dict(models.FAMILIES))
    models.register(toy_family())
    c = tiny_config(tmp_path, max_steps=1, warmup_steps=0, sample_prompts=1,
                    sample_max_new_tokens=4)
    c.model = ConfigDict(dict(model_type="toy", vocab=512, context=64, width=32, depth=2,
                              heads=4))
    summary = train_and_evaluate(c, tmp_path / "wd")
    assert summary["steps"] == 1 and np.isfinite(summary["train/loss"])
    assert summary["samples"][0]["pi_theta"] is not None
    export = tmp_path / "wd" / "hf"
    assert json.loads((export / "config.json").read_text())["model_type"] == "toy"
    from safetensors import safe_open
    with safe_open(str(export / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        packed = f.get_tensor("decoder.layers.1.ln_1.packed")
        fc = f.get_tensor("decoder.layers.0.mlp.c_fc.weight")
        positions = f.get_tensor("embed.positions")
    assert {"embed.tokens", "decoder.layers.1.mlp.c_fc.weight", "decoder.ln_f.bias"} <= keys
    assert "decoder.layers.0.ln_1.weight" not in keys and packed.shape == (64,)
    assert fc.shape == (128, 32)  # (out, in): transposed from ours
    model = hf.load_pretrained(export)  # the table backwards, then forwards
    from dpo_jax import checkpoint as ck
    trained = ck.Checkpointer(tmp_path / "wd" / "checkpoints", async_save=False).restore_params(
        1, ck.abstract_like(common.params_of(model)))
    for k, v in models.flatten(common.params_of(model)).items():  # split back exactly
        np.testing.assert_array_equal(np.asarray(v), np.asarray(models.flatten(trained)[k]))
    np.testing.assert_array_equal(packed, np.concatenate(
        [np.asarray(trained["h"]["ln_1"][k][1]) for k in ("weight", "bias")]))
    np.testing.assert_array_equal(positions, np.asarray(trained["wpe"]["weight"])[::-1])
    assert type(model.config) is ToyConfig and model.config.activation_function == "squared_relu"
    mlp = gpt2_model.MLP(model.config, rngs=__import__("flax").nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 32))
    want = mlp.c_proj(jax.nn.relu(mlp.c_fc(x)) ** 2)  # the activation really is squared ReLU
    np.testing.assert_allclose(np.asarray(mlp(x)), np.asarray(want), rtol=1e-6)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(hf.CheckpointError, match=r"config key model: model_type is 'bert', "
                                                 r"which is not supported; supported: .*gpt2"):
        hf.config_from_hf({"model_type": "bert"}, source="config key model")


def test_checkpoint_of_the_previous_format_is_read(tmp_path):
    """Before issue 14 a checkpoint was one `state` item {params, opt_state, step} + record."""
    import optax
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    opt = optax.adam(1e-3)
    old_state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(7)}
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(old_state),
                                         record=ocp.args.JsonSave({"step": 7, "model_config": {}})))
    mngr.wait_until_finished()
    mngr.close()

    ck = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
    assert ck.latest_step() == 7
    from dpo_jax import steps
    template = steps.init_state(jax.tree.map(jnp.zeros_like, params), opt)
    state, record = ck.restore(7, checkpoint.abstract_like(template))
    np.testing.assert_array_equal(state["params"]["w"], params["w"])
    assert int(state["step"]) == 7 and int(state["bad_step"]) == 0 and record["step"] == 7
    fresh = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)  # as generate.py does
    alone = fresh.restore_params(7, checkpoint.abstract_like(params))  # no optimizer built
    np.testing.assert_array_equal(alone["b"], params["b"])


def test_the_output_hook_caps_every_consumer_of_logits():
    """A family's soft-cap lives in one place: the logits, the chunked log-probs (with and
    without a completion window) and sampling all see it."""
    from flax import nnx
    from dpo_jax import logprobs, sampling
    cfg = ToyConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                    activation_function="gelu_new")
    plain = gpt2.GPT2(cfg, rngs=nnx.Rngs(0))
    capped = common.build(gpt2.GPT2, dataclasses.replace(cfg, final_logit_softcap=0.5),
                          common.params_of(plain))
    ids = np.random.default_rng(0).integers(0, 64, (2, 12))
    mask, loss = np.ones_like(ids), np.ones_like(ids)
    z = np.asarray(plain(ids, mask), np.float64)
    want = 0.5 * np.tanh(z / 0.5)
    np.testing.assert_allclose(np.asarray(capped(ids, mask)), want, atol=1e-6)
    lp = want[:, :-1] - np.log(np.exp(want[:, :-1]).sum(-1, keepdims=True))
    want_logps = np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0].sum(-1)
    for chunk in (0, 5):
        got, _ = logprobs.sequence_logprobs(capped, ids, mask, loss, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(got), want_logps, rtol=1e-5)
    greedy = sampling.SamplingConfig(max_new_tokens=3)
    prompt = (ids[:, :4].astype(np.int32), np.ones((2, 4), np.int32))
    out = sampling.generate(capped, *prompt, greedy)  # cached decode
    ref = sampling.generate(capped, *prompt, greedy, use_cache=False)
    np.testing.assert_array_equal(out, ref)
    assert np.abs(np.asarray(capped.lm_head(capped.hidden_states(ids)))).max() <= 0.5
