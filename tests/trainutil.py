"""Helpers for the trainer tests: tiny configs and the seed's one-pair experiment."""

import json
import os
import tempfile
from pathlib import Path

from configs import tiny
from dpo_jax.bpe import train_byte_level_bpe

REPO = Path(__file__).resolve().parents[1]

# The environment of CLI subprocesses: one CPU device (as a newcomer runs it, not the 8 simulated
# ones of the sharding tests), and one persistent compilation cache for the whole session, so a
# program compiled by one subprocess is not compiled again by the next (the same executable:
# the numbers are bitwise the same).
CLI_ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO), "XLA_FLAGS": os.environ.get("DPO_JAX_SUITE_XLA_FLAGS", ""),
           "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="dpo_jax_test_xla_cache_"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
SEED_ROW = {
    "prompt": "Without wishing to be a killjoy, Brad Sykes is responsible for at least two of the "
              "most dull and clich films i've ever seen - this being one of them, and Camp Blood "
              "being another. The acting is",
    "chosen": " spot on. Some of the best parts are performed by Mark Rylance in a show of love "
              "and care. The music is also good - in fact, Brad's vocal prowess proves more than "
              "capable of playing a harmonica, even to the point",
    "rejected": " mostly bad, although I did give it an 8 out of 10 - perhaps because of the way "
                "the film uses \"sadamune.\" The only character to do more than a short joke is "
                "the famous ganashi lady, and this is not",
}


def tiny_config(tmp_path, **overrides):
    c = tiny.get_config()
    c.data_cache_dir = str(tmp_path / "data_cache")
    c.progress_bar = False
    for k, v in overrides.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def seed_experiment_config(tmp_path, **overrides):
    """The seed's controlled experiment: one preference pair, a tiny random GPT-2."""
    tok_dir = tmp_path / "seed_tok"
    tok = train_byte_level_bpe([SEED_ROW[k] for k in SEED_ROW] * 4, vocab_size=400, path=tok_dir)
    data = tmp_path / "seed.jsonl"
    data.write_text(json.dumps(SEED_ROW) + "\n")
    kw = dict(tokenizer_name_or_path=str(tok_dir), dataset_name=str(data),
              eval_dataset_name=str(data), **{"model.vocab_size": len(tok),
                                              "model.n_positions": 192},
              max_length=160, max_prompt_length=96, train_batch_size=1, eval_batch_size=1,
              max_steps=30, warmup_steps=0, lr_scheduler_type="constant", learning_rate=3e-3,
              logging_steps=10, eval_steps=0, save_steps=1000, sample_prompts=1, mesh_data=1,
              sample_max_new_tokens=8)
    kw.update(overrides)
    return tiny_config(tmp_path, **kw), tok
