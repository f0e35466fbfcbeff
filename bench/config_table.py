"""Prints the README's table of config keys from configs/default.py's comments.

    python bench/config_table.py   # paste into README.md between the config-keys markers
"""

import re
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
    print(table(), end="")
