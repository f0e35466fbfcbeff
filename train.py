"""DPO training: ``python train.py --config configs/gpt2.py --workdir runs/gpt2``.

Intentionally thin: flags in, ``dpo_jax.trainer.train_and_evaluate`` does the work. Override any
config key on the command line (``--config.beta=0.2``); a misspelled key fails with the valid ones.
Running the same command again on the same workdir resumes from its last checkpoint.

Expected errors (a bad config, data or checkpoint, a mismatch, an OS error) print as one line
and exit 1; SIGTERM saves the current step and exits 143, Ctrl-C exits 130. ``--verbose`` (or
DPO_JAX_TRACEBACK=1) prints their traceback too; unexpected errors always keep theirs.
"""

import os
import signal
import sys


def _stopped_at_startup(signum, frame):
    """SIGTERM or Ctrl-C while the libraries load (before the trainer's own handlers): nothing
    has been written yet; one line, not an import's traceback."""
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    print(f"train.py: error: stopped by {name} while starting (nothing was written)",
          file=sys.stderr, flush=True)
    os._exit(143 if signum == signal.SIGTERM else 130)


if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, _stopped_at_startup)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from dpo_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the HF export go.")
flags.DEFINE_bool("verbose", False, "Print the traceback of expected errors too.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dpo_jax.tracking import console_logging
    console_logging()
    from dpo_jax.errors import DpoError, Stopped
    from dpo_jax.trainer import train_and_evaluate
    # A Ctrl-C that lands in a garbage-collection callback is printed and swallowed by CPython;
    # the trainer's SIGINT flag stops the run anyway, so that print is only noise.
    default_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, KeyboardInterrupt) \
        else default_hook(u)
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (DpoError, OSError) as e:
        if FLAGS.verbose or os.environ.get("DPO_JAX_TRACEBACK"):
            raise
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Everything is safe by now (saves finished or abandoned, files closed, lock released).
        # Leave without the interpreter's teardown, where a checkpoint writer's background
        # threads that are still failing would print their traces after this line.
        os._exit(e.exit_code if isinstance(e, Stopped) else 1)


def check_overrides(argv):
    """train.py's flag checks (``dpo_jax.cli``), for drivers that run this module."""
    cli.check_overrides(argv, "train.py")


if __name__ == "__main__":
    check_overrides(sys.argv)
    app.run(main)
