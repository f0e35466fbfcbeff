"""The README's examples run and its config table matches configs/default.py."""

import importlib.util
import re
from pathlib import Path

import numpy as np

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
