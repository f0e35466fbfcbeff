"""DPO training: ``python train.py --config configs/gpt2.py --workdir runs/gpt2``.

Intentionally thin: flags in, ``dpo_jax.trainer.train_and_evaluate`` does the work. Override any
config key on the command line (``--config.beta=0.2``); a misspelled key fails with the valid ones.
Running the same command again on the same workdir resumes from its last checkpoint.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the HF export go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "datasets", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dpo_jax.trainer import train_and_evaluate
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


def check_overrides(argv):
    """A misspelled ``--config.KEY`` exits with the valid keys (ml_collections would raise a
    traceback from inside flag parsing)."""
    import importlib.util
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None or not path.endswith(".py"):
        return
    spec = importlib.util.spec_from_file_location("_config", path.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def keys(cfg, prefix=""):
        for k, v in cfg.items():
            yield from keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]

    valid = sorted(keys(module.get_config()))
    for a in argv:
        if a.startswith("--config."):
            key = a[len("--config."):].split("=", 1)[0]
            if key not in valid:
                sys.exit(f"train.py: unknown config key {key!r} (in {a!r}).\n"
                         f"Valid keys: {', '.join(valid)}")


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    check_overrides(sys.argv)
    app.run(main)
