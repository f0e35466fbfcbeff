"""The README's examples run and its config table matches configs/default.py."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from parity import padded_batch

from dpo_jax import losses as L

README = Path(__file__).parents[1] / "README.md"


def test_readme_add_your_own_loss_example_runs():
    text = README.read_text()
    block = re.search(r"<!-- add-your-own-loss -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its worked example"
    namespace = {}
    try:
        exec(block.group(1), namespace)
    finally:
        L.LOSSES.pop("squared_hinge", None)
    np.testing.assert_allclose(np.asarray(namespace["per_pair"]), [0.64, 2.25], rtol=1e-6)


def readme_block(name: str) -> str:
    block = re.search(rf"<!-- readme-test: {name} -->\s*```python\n(.*?)```", README.read_text(),
                      re.S)
    assert block, f"README lost its {name} block"
    return block.group(1)


def test_readme_hf_block_runs(tiny_hf, tmp_path):
    """The README's model API, as written, on a GPT-2 written by transformers."""
    transformers = pytest.importorskip("transformers")
    tmodel, path = tiny_hf
    ids, mask, loss_mask = padded_batch(np.random.default_rng(0), tmodel.config.vocab_size)
    ns = {"path": path, "input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
          "out": tmp_path / "out"}
    exec(readme_block("hf"), ns)
    assert ns["logits"].shape == (*ids.shape, tmodel.config.vocab_size)
    assert ns["logps"].shape == ns["n_tokens"].shape == (ids.shape[0],)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_readme_data_block_runs(tmp_path, monkeypatch):
    """The README's data API, as written, on a small file and a tokenizer trained here."""
    from dpo_jax.bpe import train_byte_level_bpe
    rows = [{"prompt": f"Review {i}: the film was", "chosen": " good and fun",
             "rejected": " bad" + " and dull" * (i % 5)} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    ns = {"tokenizer": train_byte_level_bpe([r["prompt"] + r["chosen"] + r["rejected"]
                                             for r in rows], vocab_size=300)}
    exec(readme_block("data"), ns)
    assert len(ns["pairs"]) == 40 and ns["batch"]["input_ids"].shape[0] == 16
    assert ns["state"] == {"epoch": 0, "index": 1, "seed": 0}


def test_readme_config_table_is_current():
    spec = importlib.util.spec_from_file_location(
        "config_table", Path(__file__).parents[1] / "bench" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = README.read_text()
    assert module.table() in readme, "regenerate: python bench/config_table.py"
    from configs import default
    keys = [k for k in default.get_config().keys() if k != "model"]
    assert all(f"| `{k}` |" in readme for k in keys)
