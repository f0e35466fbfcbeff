"""Side-by-side completions of the reference model and the trained policy.

    python generate.py --workdir runs/tiny --prompt "The acting was"
    python generate.py --workdir runs/tiny --prompts_file prompts.txt --temperature 0.7 --top_p 0.9

The reference is rebuilt from the run's config (the same checkpoint or random init); the policy is
the run's latest checkpoint (or its HF export with --from_export). An empty prompt starts from
the tokenizer's BOS token: an unconditional sample. Expected errors print as one line (--verbose
or DPO_JAX_TRACEBACK=1 for the traceback).
"""

import json
import os
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's workdir.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
flags.DEFINE_integer("max_new_tokens", 48, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = off.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("from_export", False, "Take the policy from workdir/hf, not the checkpoint.")
flags.DEFINE_bool("verbose", False, "Print the traceback of expected errors too.")
flags.mark_flag_as_required("workdir")


def load_policy(config, workdir: Path, reference):
    """The trained policy: the latest checkpoint's trainable params on the reference's (the
    run's tuning method assembles them; no optimizer is built), or the HF export with
    --from_export."""
    from dpo_jax import checkpoint, hf, models, tuning
    from dpo_jax.errors import DpoError
    from dpo_jax.models import common
    if FLAGS.from_export:
        return hf.load_pretrained(local_copy(workdir / "hf"))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
    s = ckpt.latest_step()
    if s is None:
        raise DpoError(f"{workdir}: no complete checkpoint (train first, or --from_export)")
    expect = {"model_config": checkpoint.model_config_record(reference.config)}
    print(f"policy: {workdir / 'checkpoints' / str(s)}", file=sys.stderr)
    method = tuning.for_config(config.tuning, models.family_of(reference.config),
                               reference.config, ref_dtype=config.model.ref_dtype)
    return method.restore_policy(ckpt, s, common.params_of(reference), expect)


def local_copy(p):
    """A folder of the workdir on this disk (fetched once where the workdir is a bucket)."""
    from dpo_jax import storage
    return storage.fetch(str(p), "--workdir") if storage.is_remote(p) else p


def run():
    from dpo_jax import config as configs, hf, hub, sampling, storage
    from dpo_jax.errors import ConfigError, DpoError
    workdir = storage.path(FLAGS.workdir)
    if storage.is_remote(workdir):
        storage.check_access(workdir)
    if not (workdir / "config.json").is_file():
        raise DpoError(f"{workdir} is not the workdir of a training run (it has no config.json)")
    config = configs.build(json.loads((workdir / "config.json").read_text()))
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(FLAGS.prompts_file).read_text()
                    .splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give --prompt (repeatable) or --prompts_file")
    try:
        cfg = sampling.SamplingConfig(max_new_tokens=FLAGS.max_new_tokens,
                                      temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                      top_p=FLAGS.top_p)
    except ValueError as e:
        raise ConfigError(f"generate.py flags: {e}") from None
    tokenizer = hub.load_tokenizer(local_copy(workdir / "tokenizer"))
    model_cfg, ref_params = hf.initial_model(config.model, tokenizer, seed=config.run.seed)
    cfg = sampling.SamplingConfig(**{**cfg.__dict__,
                                     "eos_id": sampling.stop_ids(model_cfg, tokenizer)})
    reference = hf.build(model_cfg, ref_params)
    policy = load_policy(config, workdir, reference)
    ref = sampling.complete(reference, tokenizer, prompts, cfg, seed=FLAGS.seed)
    theta = sampling.complete(policy, tokenizer, prompts, cfg, seed=FLAGS.seed)
    for i, (p, r, t) in enumerate(zip(prompts, ref, theta), 1):
        print(f"=== {i}: {p!r}\n  pi_ref   | {p}{r}\n  pi_theta | {p}{t}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dpo_jax.tracking import console_logging
    console_logging()  # train.py's: the completions, not orbax's and absl's INFO lines
    from dpo_jax.errors import DpoError
    try:
        run()
    except (DpoError, OSError) as e:
        if FLAGS.verbose or os.environ.get("DPO_JAX_TRACEBACK"):
            raise
        print(f"generate.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
