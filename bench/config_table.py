"""Prints the README's table of config keys from the typed config groups (dpo_jax/config.py).

    python bench/config_table.py           # print it
    python bench/config_table.py --write   # replace it in README.md, between the markers
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpo_jax.config import table  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"

if __name__ == "__main__":
    if "--write" in sys.argv:
        text = README.read_text()
        new = re.sub(r"(<!-- config-keys -->\n).*?(<!-- /config-keys -->)",
                     lambda m: m.group(1) + table() + m.group(2), text, flags=re.S)
        README.write_text(new)
    else:
        print(table(), end="")
