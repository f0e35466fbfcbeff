"""Prints the README's table of config keys from configs/default.py's comments.

    python bench/config_table.py           # print it
    python bench/config_table.py --write   # replace it in README.md, between the markers
"""

import re
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.py"


def table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for line in DEFAULT.read_text().splitlines():
        if m := re.match(r"\s*# ---- (.*)", line):
            rows.append(f"| **{m.group(1)}** | | |")
        elif "c.model = ml_collections" in line:
            rows.append("| `model` | | architecture for random init (when `model_name_or_path` is `\"\"`) |")
        elif m := re.match(r"\s*(\w+)=(\d+|\"\w+\"),\s*#\s*(.*)", line):
            rows.append(f"| `model.{m.group(1)}` | `{m.group(2)}` | {m.group(3)} |")
        elif m := re.match(r"\s*c\.(\w+) = (.*?)\s*#\s*(.*)$", line):
            rows.append(f"| `{m.group(1)}` | `{m.group(2)}` | {m.group(3).replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        readme = DEFAULT.parents[1] / "README.md"
        text = re.sub(r"(<!-- config-keys -->\n).*?(<!-- /config-keys -->)",
                      lambda m: m.group(1) + table() + m.group(2), readme.read_text(), flags=re.S)
        readme.write_text(text)
    else:
        print(table(), end="")
