"""Issue 26: workdirs and data on object storage, against a real GCS emulator (fake-gcs-server,
started by the session's ``gcs`` fixture; the project's own clients talk to it through the
standard STORAGE_EMULATOR_HOST, nothing mocked).

A run to gs:// ends with the same weights, byte for byte, as the same run to a local folder; a
SIGKILL mid-run and a rerun end with them too, read back from the emulator (and a damaged
checkpoint in the bucket is then set aside and the one before it resumed); a second run on a workdir
whose lease is held stops naming the holder.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpo_jax import storage
from dpo_jax.errors import DpoError
from test_failures import COMMON, ENV, driver, cache, straight  # noqa: F401  (fixtures)
from trainutil import REPO


def run_gs(args, gcs, script="train.py", env=None, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=REPO,
                          env={**ENV, **gcs.env, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("url, fragment", [
    ("gs:/bucket/run", "not a gs:// URL (gs://BUCKET/PATH"),
    ("gs:///run", "not a gs:// URL"),
    ("gcs://bucket/run", "gcs:// is not a storage this project serves"),
    ("hdfs://bucket/run", "hdfs:// is not a storage"),
])
def test_a_url_we_do_not_serve_is_an_error_never_a_local_folder(url, fragment, tmp_path,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DpoError) as e:
        storage.path(url)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # no folder "gs:" was made
    assert storage.path("a:b").name == "a:b"  # a colon in a local name is still a local name


def test_no_credentials_and_no_emulator_names_the_bucket_at_once(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud login either
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                        "gs://my-bucket/run1"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in {**ENV, **os.environ}.items()
                                         if k not in ("STORAGE_EMULATOR_HOST",
                                                      "GOOGLE_APPLICATION_CREDENTIALS")}
                       | {"CLOUDSDK_CONFIG": str(tmp_path)})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "no Google Cloud credentials for bucket my-bucket" in line, line
    assert "gcloud auth application-default login" in line
    assert not (REPO / "gs:").exists()


def test_a_run_on_gcs_matches_the_local_run_and_survives_a_sigkill(gcs, driver, cache,  # noqa: F811
                                                                   straight):
    """SIGKILL at step 10 (checkpoint 4 complete, 8 complete or in flight), then the same
    command: the final weights read back from the emulator equal the uninterrupted local
    run's, byte for byte; every step is in metrics.jsonl once."""
    wd = gcs.bucket("kill-resume") + "/run"
    r = run_gs([*COMMON, cache, "--workdir", wd], gcs, env={"FAULT_KILL": "10"},
               script=str(driver))
    assert r.returncode == -9, r.stderr[-3000:]
    assert any(n.startswith("run/checkpoints/4/") for n in gcs.list(wd)), gcs.list(wd)
    r = run_gs([*COMMON, cache, "--workdir", wd], gcs)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert gcs.read(f"{wd}/hf/model.safetensors") == straight[1], "not bitwise equal"
    steps = [json.loads(x)["step"] for x in gcs.read(f"{wd}/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(1, 13)), steps
    names = gcs.list(wd)
    for f in ("config.json", "train.log", "summary.json", "tokenizer/tokenizer.json",
              "hf/config.json", "checkpoints/12/commit_success.txt"):
        assert f"run/{f}" in names, (f, names)
    assert not [n for n in names if n.startswith("run/lock")]  # released at exit
    summary = json.loads(gcs.read(f"{wd}/summary.json"))
    assert summary["hf_export"] == f"{wd}/hf" and summary["checkpoint"] == f"{wd}/checkpoints/12"
    # generate.py reads the run back from the bucket
    g = run_gs(["--workdir", wd, "--prompt", "The movie was", "--max_new_tokens", "4"], gcs,
               script="generate.py")
    assert g.returncode == 0 and "The movie was" in g.stdout, g.stderr[-2000:]
    # a damaged checkpoint in the bucket is set aside and the one before it resumed: flip a
    # byte of every params data object of step 12, then extend the run to 16 steps
    for n in [n for n in gcs.list(f"{wd}/checkpoints/12/params") if "/d/" in n]:
        blob = bytearray(gcs.read(f"gs://kill-resume/{n}"))
        blob[len(blob) // 2] ^= 0xFF
        gcs.write(f"gs://kill-resume/{n}", bytes(blob))
    r = run_gs([*COMMON[:2], "--config.max_steps=16", *COMMON[3:], cache, "--workdir", wd], gcs)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "moving it to" in r.stderr and "12.damaged" in r.stderr, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 8" in r.stderr
    names = gcs.list(f"{wd}/checkpoints")
    assert any("/12.damaged/" in n for n in names) and any("/16/" in n for n in names)


def test_the_lease_stops_a_second_run_and_expires_after_a_kill(gcs, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    url = gcs.bucket("lease") + "/run/lock"
    held = storage.Lease(url)
    try:
        with pytest.raises(DpoError) as e:
            storage.Lease(url)
        assert "is in use by another run" in str(e.value) and held.holder in str(e.value)
    finally:
        held.release()
    assert "run/lock" not in gcs.list("gs://lease/run")
    # a lease another host stopped refreshing long ago is taken over
    gcs.write(url, json.dumps({"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1,
                               "refreshed": 0, "since": "then"}).encode())
    again = storage.Lease(url)
    assert json.loads(gcs.read(url))["pid"] == os.getpid()
    again.release()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "save_to_disk"])
def test_data_from_the_bucket_equals_the_local_file(gcs, monkeypatch, tmp_path, fmt):
    import datasets

    from dpo_jax import data
    from dpo_jax.hub import load_tokenizer
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    rows = [json.loads(x) for x in (REPO / "data/tiny/eval.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    local = tmp_path / f"prefs.{fmt}" if fmt != "save_to_disk" else tmp_path / "prefs"
    {"jsonl": lambda: ds.to_json(local), "parquet": lambda: ds.to_parquet(local),
     "save_to_disk": lambda: ds.save_to_disk(local)}[fmt]()
    bucket = gcs.bucket(f"data-{fmt.replace('_', '-')}")
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        rel = f.relative_to(local.parent).as_posix()
        gcs.write(f"{bucket}/{rel}", f.read_bytes())
    tok = load_tokenizer(str(REPO / "data/tiny/tokenizer"))
    cfg = data.DataConfig(dataset_name=str(local))
    here = data.load_pairs(cfg.source(str(local), "train"), tok, shard=(1, 2))
    there = data.load_pairs(cfg.source(f"{bucket}/{local.name}", "train"), tok, shard=(1, 2))
    for a, b in ((here.prompt, there.prompt), (here.chosen, there.chosen),
                 (here.rejected, there.rejected)):
        assert len(a) == len(b) == len(rows) // 2  # this process's share
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_base_model_and_an_adapter_load_from_the_bucket(gcs, monkeypatch, tmp_path):
    """model_name_or_path=gs://... and lora_init=gs://...: the run starts from the same params
    as from the local folders."""
    import jax

    from dpo_jax import models, trainer
    from test_tuning import lora_config, torch_base
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    base = tmp_path / "base"
    torch_base("gpt2").save_pretrained(base)
    first = tmp_path / "first"
    trainer.train_and_evaluate(lora_config(tmp_path, base, max_steps=2, save_steps=2), first)
    bucket = gcs.bucket("models")
    for folder, name in ((base, "base"), (first / "adapter", "adapter")):
        for f in folder.iterdir():
            gcs.write(f"{bucket}/{name}/{f.name}", f.read_bytes())
    runs = [trainer.setup(lora_config(tmp_path, b, lora_init=a), tmp_path / w) for b, a, w in
            ((base, str(first / "adapter"), "here"),
             (f"{bucket}/base", f"{bucket}/adapter", "there"))]
    here, there = (models.flatten(jax.tree.map(np.asarray, r.state["params"])) for r in runs)
    assert here.keys() == there.keys() and any(np.abs(v).max() > 0 for v in here.values())
    for k in here:
        np.testing.assert_array_equal(here[k], there[k], err_msg=k)
    for r in runs:
        r.ckpt.close()
