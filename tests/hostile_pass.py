"""A hostile, careless user's pass over the CLIs (issue 12): each case runs train.py or
generate.py as a user would and records what came back.

    python tests/hostile_pass.py [--out runs/hostile.md] [--only SUBSTRING]

Not part of the pytest suite (it takes ~10 minutes); tests/test_failures.py holds the cases
that guard the promises. Each row: the case, what it expects, the exit code, the one line
printed (or "TRACEBACK" when a traceback was printed for an expected error), and ok / FAIL.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from trainutil import CLI_ENV  # noqa: E402

TINY = ["--config", "configs/tiny.py", "--config.progress_bar=False", "--config.eval_steps=0",
        "--config.sample_prompts=0"]
SHORT = TINY + ["--config.max_steps=6", "--config.save_steps=2", "--config.warmup_steps=0"]
GOOD_ROW = {"prompt": "The film was", "chosen": " good and fun", "rejected": " bad and dull"}


class Ctx:
    def __init__(self, root: Path):
        self.root, self.n = root, 0
        self.cache = f"--config.data_cache_dir={root / 'cache'}"

    def wd(self) -> Path:
        self.n += 1
        return self.root / f"wd{self.n}"

    def file(self, name: str, text: str | bytes) -> Path:
        p = self.root / "data" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        return p

    def jsonl(self, name: str, rows) -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))


def cli(args, script="train.py", env=None, timeout=300, signal_after=None, sig=signal.SIGTERM):
    p = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO,
                         env={**CLI_ENV, **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=(lambda: os.setpgrp()) if signal_after else None)
    if signal_after:
        time.sleep(signal_after)
        p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def data_case(ctx, name, rows_or_text, expect, extra=()):
    src = (ctx.jsonl(name, rows_or_text) if isinstance(rows_or_text, list)
           else ctx.file(name, rows_or_text))
    return (SHORT + [ctx.cache, f"--config.dataset_name={src}", "--config.eval_dataset_name=",
                     "--config.dataset_test_split=", "--workdir", ctx.wd(), *extra], expect)


def cases(ctx):
    good = [GOOD_ROW] * 8
    # ---------------------------------------------------------------- data
    yield "data: empty .jsonl", data_case(ctx, "empty.jsonl", "", "the file is empty")
    yield "data: whitespace-only .jsonl", data_case(ctx, "ws.jsonl", "\n  \n", "the file is empty")
    yield "data: .json holding []", data_case(ctx, "list.json", "[]", "holds no rows")
    yield "data: .csv with a header only", data_case(ctx, "h.csv", "prompt,chosen,rejected\n",
                                                     "holds no rows")
    yield "data: a .json of one object, batch 8", data_case(
        ctx, "one.json", json.dumps(GOOD_ROW), "1 usable pairs make no full batch of "
        "train_batch_size=8")
    yield "data: 3 rows for a batch of 8", data_case(ctx, "three.jsonl", [GOOD_ROW] * 3,
                                                     "three.jsonl: 3 usable pairs")
    yield "data: a JSON list of strings", data_case(ctx, "strs.json", json.dumps(["a", "b"]),
                                                    "no column 'chosen'")
    yield "data: missing rejected column", data_case(
        ctx, "norej.jsonl", [{"prompt": "a", "chosen": "b"}] * 8, "no column 'rejected'")
    yield "data: a number prompt (row 5)", data_case(
        ctx, "num.jsonl", good[:4] + [dict(GOOD_ROW, prompt=7)] + good[:3], "row 5")
    yield "data: null chosen (row 2)", data_case(
        ctx, "null.jsonl", good[:1] + [dict(GOOD_ROW, chosen=None)] + good, "row 2: column "
        "'chosen' is null")
    yield "data: non-UTF-8 bytes", data_case(
        ctx, "latin.jsonl", (json.dumps(GOOD_ROW) + "\n").encode() * 2 + b'{"prompt": "caf\xe9"}\n',
        "line 3: bytes that are not UTF-8")
    yield "data: malformed JSON line 4", data_case(
        ctx, "bad.jsonl", "".join(json.dumps(GOOD_ROW) + "\n" for _ in range(3)) + "{oops\n",
        "line 4: malformed JSON line")
    yield "data: blank lines shift rows (row 3 on line 5)", data_case(
        ctx, "blanks.jsonl", json.dumps(GOOD_ROW) + "\n\n" + json.dumps(GOOD_ROW) + "\n\n" +
        json.dumps(dict(GOOD_ROW, chosen=None)) + "\n", "row 3 (line 5)")
    yield "data: every pair identical", data_case(
        ctx, "same.jsonl", [dict(GOOD_ROW, rejected=GOOD_ROW["chosen"])] * 8,
        "no usable preference pairs (dropped: {'identical_completions': 8}")
    yield "data: whitespace-only completions dropped", data_case(
        ctx, "wsc.jsonl", [dict(GOOD_ROW, chosen="   ")] * 8, "'empty_completion': 8")
    yield "data: csv with other columns", data_case(ctx, "other.csv", "a,b\n1,2\n",
                                                    "no column 'chosen'")
    yield "data: a .parquet that is text", data_case(ctx, "fake.parquet", "not parquet",
                                                     "fake.parquet: could not be read as parquet")
    d = ctx.root / "data" / "dir.jsonl"
    d.mkdir(parents=True, exist_ok=True)
    yield "data: a folder named x.jsonl", (SHORT + [ctx.cache, f"--config.dataset_name={d}",
                                                    "--workdir", ctx.wd()],
                                           "not a folder written by datasets' save_to_disk")
    yield "data: a hub id offline", (SHORT + [ctx.cache, "--config.dataset_name=someone/data",
                                              "--workdir", ctx.wd()], "cannot be reached")
    yield "data: eval file missing", (SHORT + [ctx.cache, "--config.eval_dataset_name=nope.jsonl",
                                               "--workdir", ctx.wd()], "nope.jsonl: no such data")
    yield "data: skip mode trains past bad rows", data_case(
        ctx, "skip.jsonl", good + [dict(GOOD_ROW, chosen=None)], "rc=0",
        ["--config.on_bad_row=skip", "--config.train_batch_size=4"])
    yield "data: chat rows, no template", data_case(
        ctx, "chat.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                             "chosen": [{"role": "assistant", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]}] * 8,
        "row 1: conversational rows need a tokenizer with a chat template")
    yield "data: chat chosen, text rejected", data_case(
        ctx, "mixed.jsonl", [{"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}],
                              "rejected": "b"}] * 8, "both be conversations or both be text")
    # ---------------------------------------------------------------- config
    bad = [("gradient_accumulation_steps=0", "must be >= 1"), ("learning_rate=0", "learning_rate"),
           ("learning_rate=-1", "learning_rate"), ("beta=0", "beta must be > 0"),
           ("label_smoothing=0.7", "label_smoothing must lie in [0, 0.5]"),
           ("loss_type=dpo", "'dpo' is not a known loss"),
           ("loss_type=sigmoid,ipo", "rc=0"), ("optim=adam", "config key optim='adam'"),
           ("lr_scheduler_type=cos", "lr_scheduler_type='cos'"),
           ("warmup_steps=-1", "warmup_steps=-1: must be >= 0"),
           ("max_prompt_length=600 --config.tokenization=separate", "the prompt must leave room"),
           ("adam_beta2=1.0", "adam_beta2=1.0: must lie in"),
           ("min_lr_ratio=2.0", "min_lr_ratio=2.0: must lie in [0, 1]"),
           ("mesh_data=3", "needs 3 devices; there are 1"),
           ("mesh_tensor=-1", "at most one may be -1"), ("model.n_head=5", "not divisible by n_head=5"),
           ("model.vocab_size=10", "the tokenizer has 512 tokens"),
           ("max_length=100", "max_length=100 exceeds the model's n_positions=64"),
           ("remat_policy=bogus", "remat_policy='bogus'"), ("dtype=bfloat16", "rc=0"),
           ("ref_dtype=int8", "ref_dtype='int8'"), ("length_buckets=(1000,)", "length_buckets"),
           ("prompt_column=chosen", "name the same column"),
           ("model_name_or_path=./nope", "./nope: no such checkpoint folder"),
           ("model_name_or_path=someone/model", "cannot be reached"),
           ("tokenizer_name_or_path=./nope", "no such tokenizer folder"),
           ("allow_resume_changes=colour", "'colour'] are not keys that a resume checks"),
           ("model.model_type=bert", "model_type is 'bert', which is not supported"),
           ("eval_steps=-1", "eval_steps=-1: must be >= 0"),
           ("sample_max_new_tokens=0", "sample_max_new_tokens=0"),
           # the keys of issues 17 and 18
           ("packing=yes", "config key packing='yes'"),
           ("packing=balanced --config.max_completion_length=0", "needs max_completion_length"),
           ("packing=balanced --config.length_buckets=(32,)", "exclude each other"),
           ("packing=balanced --config.pack_rows=1", "pack_rows=1 is too few"),
           ("packing=balanced", "rc=0"), ("packing=budget", "rc=0"),
           ("packing=budget --config.length_buckets=(32,)", "exclude each other"),
           ("packing=budget --config.layout=pair --config.pack_rows=1", "pack_rows=1 is too few"),
           ("attention=flash", "config key attention='flash'"),
           ("attention=cudnn", "attention='cudnn': cudnn needs a GPU"),
           ("attention=splash", "attention='splash': splash needs a TPU (platform cpu)"),
           ("report_to=mlflow", "config key report_to='mlflow'"),
           ("report_to=none,wandb", "config key report_to='none,wandb'"),
           ("ld_alpha=2", "ld_alpha"), ("f_divergence_type=kl", "f_divergence_type"),
           ("f_divergence_type=js_divergence --config.loss_type=nca_pair",
            "applies to the losses"),
           ("use_weighting=True --config.loss_type=aot", "does not apply to aot"),
           ("sync_ref_model=True --config.precompute_ref_log_probs=True", "cannot apply"),
           ("sync_ref_model=True --config.ref_model_sync_steps=0", "ref_model_sync_steps=0"),
           ("sync_ref_model=True --config.ref_model_mixup_alpha=1.5", "ref_model_mixup_alpha"),
           ("sample_top_p=0", "sample_top_p"), ("token_metrics=maybe", "token_metrics"),
           # issues 24 and 25: DoRA, TRL's names, weights
           ("use_dora=True", "use_dora=True needs lora_rank > 0"),
           ("use_dora=True --config.lora_rank=4", "rc=0"),
           ("loss_weights=1,-1 --config.loss_type=sigmoid,sft", "a weight must be >= 0"),
           ("bf16=False --config.gradient_checkpointing=True", "rc=0"),
           ("per_device_train_batch_size=4 --config.optim=adamw_torch", "rc=0"),
           ("output_dir=runs/x", "pass --workdir runs/x"),
           ("warmup_ratio=0.1", "set warmup_steps"),
           ("lora_init=/nonexistent --config.lora_rank=4", "no adapter_config.json there")]
    for override, expect in bad:
        extra = ["--config.loss_weights=1,0.5"] if override.startswith("loss_type=sigmoid,") else []
        yield f"config: {override}", (SHORT + [ctx.cache, *f"--config.{override}".split(),
                                               *extra, "--workdir", ctx.wd()], expect)
    bad_adapter = ctx.file("bad_adapter/adapter_config.json", "{ not json")
    yield "config: lora_init with a corrupt adapter_config.json", (
        SHORT + [ctx.cache, "--config.lora_rank=4", f"--config.lora_init={bad_adapter.parent}",
                 "--workdir", ctx.wd()], "not a PEFT adapter config")
    yield "config: discopop warns at the start", (
        SHORT + [ctx.cache, "--config.loss_type=discopop", "--workdir", ctx.wd()],
        "rc=0&watch rewards/accuracies in the first steps")
    yield "config: missing file", (["--config", "nope.py", "--workdir", ctx.wd()],
                                   "config file nope.py does not exist")
    yield "config: misspelled key", (TINY + ["--config.bta=1", "--workdir", ctx.wd()],
                                     "unknown config key 'bta' (in '--config.bta=1'); did you "
                                     "mean beta?")
    yield "config: :arg a config does not take", (["--config", "configs/tiny.py:x",
                                                   "--workdir", ctx.wd()], "get_config('x')")
    yield "config: type of a value", (SHORT + ["--config.train_batch_size=abc", "--workdir",
                                               ctx.wd()], "invalid literal for int()")
    # ---------------------------------------------------------------- workdir, checkpoints
    f = ctx.file("afile", "x")
    yield "workdir: a file", (SHORT + [ctx.cache, "--workdir", f], "is a file, not a folder")
    # issue 26: object storage
    yield "workdir: gs:/ with one slash", (SHORT + ["--workdir", "gs:/bucket/run"],
                                           "not a gs:// URL")
    yield "workdir: gcs:// (not a scheme we serve)", (SHORT + ["--workdir", "gcs://bucket/run"],
                                                      "gcs:// is not a storage this project")
    yield "workdir: gs:// with no credentials, no emulator", (
        SHORT + ["--workdir", "gs://my-bucket/run1"],
        "no Google Cloud credentials for bucket my-bucket")
    yield "checkpoint: latest step's metadata deleted", ("metadata",
                                                         "rc=0&has no commit files&at step 2")
    yield "checkpoint: record JSON mangled", ("record",
                                              "rc=0&resuming from the checkpoint before it")
    yield "checkpoint: data file edited in place", ("data-edit", "train_data")
    yield "checkpoint: checkpoints folder removed", ("no-ckpt", "rc=0")
    yield "metrics: binary garbage appended", ("garbage", "rc=0")
    yield "signal: SIGTERM during setup", ("term-setup", "rc=143|rc=-15")
    yield "signal: SIGINT during setup", ("int-setup", "rc=130")
    yield "signal: two SIGTERMs mid-run", ("term-twice", "stopped by SIGTERM")
    yield "disk: file-size limit hit while checkpointing", ("ulimit", "File too large")
    # ---------------------------------------------------------------- generate
    yield "generate: no --prompt", (["--workdir", "{done}"], "give --prompt")
    yield "generate: empty prompt", (["--workdir", "{done}", "--prompt", "", "--max_new_tokens",
                                      "3"], "rc=0")
    yield "generate: not a workdir", (["--workdir", ctx.root], "not the workdir of a training run")
    yield "demo: --config nope.py", (["--config", "nope.py", "--workdir", ctx.wd()],
                                     "demo.py: error: config file nope.py does not exist")
    yield "demo: --config.bogus=1", (["--config.bogus=1", "--workdir", ctx.wd()],
                                     "demo.py: error: unknown config key 'bogus'")
    yield "generate: too many new tokens", (["--workdir", "{done}", "--prompt", "x",
                                             "--max_new_tokens", "1000"],
                                            "exceeds the model's n_positions=64")
    yield "generate: top_p 0", (["--workdir", "{done}", "--prompt", "x", "--top_p", "0"],
                                "top_p=0.0")
    yield "generate: --from_export with no export", (["--workdir", "{noexport}", "--prompt", "x",
                                                      "--from_export"], "no such checkpoint folder")
    yield "generate: prompts file missing", (["--workdir", "{done}", "--prompts_file", "nope.txt"],
                                             "nope.txt")


def special(kind, ctx):
    """Cases that need a run first: (rc, out, err) of the interesting command."""
    wd = ctx.wd()
    base = SHORT + [ctx.cache, "--workdir", wd]
    if kind in ("term-setup", "int-setup"):
        sig = signal.SIGTERM if kind == "term-setup" else signal.SIGINT
        return cli(base, signal_after=2.0, sig=sig)
    if kind == "ulimit":
        code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                f"(200_000, 200_000)); sys.argv = ['train.py'] + {[str(a) for a in base]!r}; "
                f"runpy.run_path('train.py', run_name='__main__')")
        return cli([code], script="-c")
    data = ctx.jsonl(f"edit{ctx.n}.jsonl", [dict(GOOD_ROW, chosen=f" good {i}") for i in range(64)])
    base = base + [f"--config.dataset_name={data}", "--config.eval_dataset_name=",
                   "--config.dataset_test_split="]
    rc, out, err = cli(base + ["--config.max_steps=4"])  # a run to step 4, checkpoints 2 and 4
    assert rc == 0, err[-2000:]
    ck = wd / "checkpoints"
    if kind == "metadata":
        (ck / "4" / "_CHECKPOINT_METADATA").unlink()
    elif kind == "record":
        (ck / "4" / "record" / "record.json" if (ck / "4" / "record" / "record.json").exists()
         else next((ck / "4" / "record").rglob("*"))).write_text("{not json")
    elif kind == "data-edit":
        with open(data, "a") as f:
            f.write(json.dumps(dict(GOOD_ROW, chosen=" an extra row")) + "\n")
    elif kind == "no-ckpt":
        shutil.rmtree(ck)
    elif kind == "garbage":
        with open(wd / "metrics.jsonl", "ab") as f:
            f.write(b"\x00\xff\xfe garbage\n")
    elif kind == "term-twice":
        p = subprocess.Popen([sys.executable, "train.py", *map(str, base + [
            "--config.max_steps=400", "--config.num_train_epochs=100"])], cwd=REPO,
            env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(12)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
        return p.returncode, out, err
    return cli(base)


def judge(rc, out, err, expect):
    """(what the user saw, ok). ``expect``: alternatives split by "|", each a "&" of parts:
    "rc=N" or a text that must appear. A failing run must end in its one clear line, not in a
    traceback; "(+ thread traces)" marks output that third-party threads printed before it."""
    tail = [x for x in err.strip().splitlines() if x.strip()]
    last = tail[-1].strip() if tail else ""
    lines = [x for x in tail if "error:" in x or "FATAL" in x]
    shown = lines[-1].strip() if lines else last
    ends_in_trace = rc != 0 and not ("error:" in last or "FATAL" in last or
                                     last.startswith("Pass --help"))
    if ends_in_trace:
        shown = "ENDS IN A TRACEBACK: " + last
    elif "Traceback" in err:
        shown += " (+ thread traces)"

    def holds(part):
        return rc == int(part[3:]) if part.startswith("rc=") else part in err or part in out

    ok = not ends_in_trace and any(
        all(holds(p) for p in alt.split("&")) and (rc != 0 or any(p.startswith("rc=")
                                                                  for p in alt.split("&")))
        for alt in expect.split("|"))
    return shown[:200], ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "runs" / "hostile.md"))
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dpo_hostile_"))
    ctx = Ctx(root)
    done = ctx.wd()
    rc, _, err = cli(SHORT + [ctx.cache, "--workdir", done])
    assert rc == 0, err[-2000:]
    noexport = ctx.wd()
    rc, _, err = cli(SHORT + [ctx.cache, "--workdir", noexport, "--config.export_hf=False"])
    assert rc == 0, err[-2000:]
    rows = []
    for i, (name, (args, expect)) in enumerate(cases(ctx), 1):
        if a.only and a.only not in name:
            continue
        t = time.time()
        if isinstance(args, str):
            rc, out, err = special(args, ctx)
        else:
            script = ("generate.py" if name.startswith("generate") else
                      "examples/sentiment/demo.py" if name.startswith("demo") else "train.py")
            args = [str(x).format(done=done, noexport=noexport) for x in args]
            rc, out, err = cli(args, script=script)
        shown, ok = judge(rc, out, err, expect)
        rows.append(f"| {i} | {name} | `{expect}` | {rc} | {shown.replace('|', '/')} | "
                    f"{'ok' if ok else 'FAIL'} |")
        print(rows[-1], f"({time.time() - t:.0f} s)", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("| # | case | expected | rc | what the user saw | |\n"
                           "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"{sum('| ok |' in r for r in rows)} of {len(rows)} ok; table in {a.out}")


if __name__ == "__main__":
    main()
