"""Issue 14: the model contract. A family registered from inside a test trains through the whole
pipeline; checkpoints of the previous format are still read."""

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

    def tensors(c):  # its own names: "decoder.layers.{i}.<ours>", embeddings renamed
        names = models.flatten(common.params_of(common.abstract(gpt2.GPT2, c)))
        rename = {"wte.weight": "embed.tokens", "wpe.weight": "embed.positions"}
        return [HFTensor(n, f"decoder.layers.{{i}}.{n[2:]}" if n.startswith("h.")
                         else rename.get(n, f"decoder.{n}")) for n in names]

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
    assert {"embed.tokens", "decoder.layers.1.mlp.c_fc.weight", "decoder.ln_f.bias"} <= keys
    model = hf.load_pretrained(export)  # the table backwards, then forwards
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
