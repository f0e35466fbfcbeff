"""The trainer's tokens/s against the bare jitted step's, on the same batches (issue 14, item 7).

    python bench/trainer_overhead.py                      # tiny and GPT-2-small shapes
    python bench/trainer_overhead.py --shapes tiny --steps 40

Both run configs/tiny.py's data (the shipped reviews, prefix sharing, completion-only head) with
the model shape given; eval, samples and export are off, so what differs is the loop itself:
host batching, metrics, progress and checkpoint bookkeeping around the same compiled step.

- trainer: ``train_and_evaluate`` run to N1 and to N2 steps in fresh workdirs; the time per
  step is (t(N2) - t(N1)) / (N2 - N1), so setup and the final save cancel, and compilation too
  (a persistent compilation cache serves the second run).
- bare: the same train step on the same batches, pre-built and placed on the device, called
  back to back and synchronized once at the end.

tokens/s counts the real (non-padding) tokens of the batches, identically for both. Each
figure is the median of --repeats runs, bare and trainer interleaved.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # model overrides of configs/tiny.py
    "tiny": {},
    "gpt2-small": {"model.n_embd": 768, "model.n_layer": 12, "model.n_head": 12},
}


def make_config(shape: str, max_steps: int, cache: str):
    from configs import tiny
    c = tiny.get_config()
    c.data_cache_dir = cache
    c.progress_bar = False
    c.max_steps = max_steps
    c.num_train_epochs = 100
    c.eval_dataset_name = ""
    c.dataset_test_split = ""
    c.sample_prompts = 0
    c.export_hf = False
    c.logging_steps = 10
    c.save_steps = 100_000
    c.warmup_steps = 0
    c.mesh_data = 1
    for k, v in SHAPES[shape].items():
        c.model[k.split(".")[1]] = v
    return c


def trainer_seconds(shape: str, steps: int, cache: str) -> float:
    from dpo_jax.trainer import train_and_evaluate
    with tempfile.TemporaryDirectory() as wd:
        t = time.perf_counter()
        train_and_evaluate(make_config(shape, steps, cache), Path(wd) / "run")
        return time.perf_counter() - t


def trainer_step(config, workdir: Path):
    """(train_step, state, frozen, host batches, place) as the trainer's setup builds them."""
    from dpo_jax import sharding, trainer
    run = trainer.setup(config, workdir)
    host = [run.batch] + [run.next_update() for _ in range(config.max_steps - 1)]
    return (run.train_step, run.state, run.frozen, host,
            lambda b: sharding.shard_batch(run.mesh, b))


def bare(shape: str, steps: int, cache: str):
    """(seconds per step, real tokens per step) of the jitted step alone."""
    import jax
    import numpy as np
    with tempfile.TemporaryDirectory() as wd:
        step_fn, state, ref, batches, place = trainer_step(make_config(shape, steps, cache),
                                                           Path(wd))
        tokens = np.mean([float(b["attention_mask"].sum()) for b in batches])
        placed = [place(b) for b in batches]
        for b in placed[:2]:  # compile and warm up
            state, m = step_fn(state, ref, b)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for b in placed[2:]:
            state, m = step_fn(state, ref, b)
        jax.block_until_ready((state, m))
    return (time.perf_counter() - t) / (len(placed) - 2), tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny,gpt2-small")
    ap.add_argument("--repeats", type=int, default=3, help="each figure is the median of these")
    ap.add_argument("--steps", type=int, default=0, help="N2 - N1; 0 = 200 (tiny) / 12 (gpt2)")
    a = ap.parse_args()
    import jax
    cache = tempfile.mkdtemp(prefix="dpo_bench_cache_")
    # Compiled programs are cached on disk, so the two trainer runs compile (almost) nothing
    # after the first: their difference is then the loop's time alone.
    jax.config.update("jax_compilation_cache_dir", cache + "/jax")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; cpu count {os.cpu_count()}")
    print("| shape | bare step | bare tokens/s | trainer step | trainer tokens/s | trainer / bare |")
    print("|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        n = a.steps or (200 if shape == "tiny" else 12)
        n1 = 4
        bares, trainers = [], []
        for _ in range(a.repeats):  # interleaved, so slow phases of the machine hit both
            sec, tokens = bare(shape, n + 2, cache)
            bares.append(sec)
            t1 = trainer_seconds(shape, n1, cache)
            t2 = trainer_seconds(shape, n1 + n, cache)
            trainers.append((t2 - t1) / n)
        sec, tsec = statistics.median(bares), statistics.median(trainers)
        print(f"| {shape} | {1e3 * sec:.1f} ms | {tokens / sec:,.0f} | {1e3 * tsec:.1f} ms | "
              f"{tokens / tsec:,.0f} | {sec / tsec:.2f} |", flush=True)


if __name__ == "__main__":
    main()
