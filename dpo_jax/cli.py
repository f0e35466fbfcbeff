"""What the command-line tools share: their checks of --config flags, made before absl and
ml_collections parse them (which would report with tracebacks)."""

from __future__ import annotations

import importlib.util
import os
import sys

from dpo_jax.config import did_you_mean


def config_path(argv) -> str | None:
    """The --config value on the command line (path[:argument]), if any."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_overrides(argv, prog: str, default: str | None = None):
    """One clear line (``prog: error: ...``, exit 1) for what ml_collections would report with a
    traceback from inside flag parsing: a missing config file, a bad argument to its
    get_config, a misspelled ``--config.KEY`` (with the close ones, or the valid keys).
    ``default``: the config file the tool reads without --config."""
    spec_arg = config_path(argv) or default
    if spec_arg is None:
        return
    path, _, arg = spec_arg.partition(":")
    if not os.path.isfile(path):
        sys.exit(f"{prog}: error: config file {path} does not exist")
    try:
        spec = importlib.util.spec_from_file_location("_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # the user's own Python: say where, in one line
        sys.exit(f"{prog}: error: {spec_arg}: get_config{'(' + repr(arg) + ')' if arg else '()'}"
                 f" failed: {type(e).__name__}: {e}")

    def keys(c, prefix=""):
        for k, v in c.items():
            yield from keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]

    valid = sorted(keys(cfg))
    for a in argv:
        if a.startswith("--config."):
            key = a[len("--config."):].split("=", 1)[0]
            if key not in valid:
                hint = did_you_mean(key, valid) or f"; valid keys: {', '.join(valid)}"
                sys.exit(f"{prog}: error: unknown config key {key!r} (in {a!r}){hint}")


