"""Issue 6, multi-host: two processes on this machine (2 simulated CPU devices each), joined by
jax.distributed over loopback, train the tiny config: each loads and tokenizes its half of the
data, batches are assembled from process-local rows, orbax writes and restores from both."""

import json
import os
import socket
import subprocess
import sys


from trainutil import REPO


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, tmp_path, max_steps, env=None, save_steps=3):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
           + os.environ.get("DPO_JAX_SUITE_XLA_FLAGS", ""), **(env or {})}
    return [subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
         "--config.distributed=True", f"--config.coordinator_address=127.0.0.1:{port}",
         "--config.num_processes=2", f"--config.process_id={i}", f"--config.max_steps={max_steps}",
         f"--config.save_steps={save_steps}", "--config.eval_steps=0",
         "--config.logging_steps=1", "--config.warmup_steps=1",
         "--config.progress_bar=False", f"--config.data_cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]


def finish(procs):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    return outs


def launch(workdir, tmp_path, max_steps, env=None):
    return finish(start(workdir, tmp_path, max_steps, env))


def test_two_processes_train_and_checkpoint_in_a_shared_folder(tmp_path):
    """A local (shared-filesystem) workdir: each process loads its half of the data, both write
    the checkpoint, the lead reports and exports. (Resuming across both processes, and a
    SIGTERM to one of them, run below on a bucket workdir.)"""
    wd = tmp_path / "wd"
    outs = launch(wd, tmp_path, max_steps=3)
    for rc, out, err in outs:
        assert rc == 0, err[-3000:]
    assert "final train loss" in outs[0][1]   # the lead process reports and exports
    assert "final train loss" not in outs[1][1]  # (gloo prints its connections there)
    assert "kept 256" in outs[0][2] and "kept 256" in outs[1][2]  # each read half of 512 rows
    assert (wd / "hf" / "model.safetensors").exists() and (wd / "checkpoints" / "3").exists()
    steps = [json.loads(l)["step"] for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    losses = [json.loads(l)["train/loss"] for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < x < 1 for x in losses)


def test_a_sigterm_to_one_process_on_a_gcs_workdir_stops_both_and_resumes(tmp_path, gcs):
    """Two processes with their workdir on the GCS emulator. Preemption reaches hosts at
    different times: a SIGTERM to process 1 alone is gathered at the next sync point, both save
    that step to the bucket and exit 143 together (no host waits on a save the other skipped);
    the rerun (on "other VMs": nothing local is kept) resumes from it and finishes, its run
    files and export in the bucket, every step logged once."""
    import signal
    import time
    wd = gcs.bucket("multihost") + "/run"
    procs = start(wd, tmp_path, max_steps=400, env=gcs.env, save_steps=1000)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(
            n.endswith("/metrics.jsonl") for n in gcs.list(wd)):  # pushed at a checkpoint, or
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]  # 60 s
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    outs = finish(procs)
    said = []
    for rc, out, err in outs:
        assert rc == 143, err[-3000:]
        said.append([x for x in err.splitlines() if "stopped by SIGTERM at step" in x][-1])
    step = int(said[0].split("at step ")[1].split(";")[0])
    assert f"at step {step};" in said[1] and step < 400
    assert f"run/checkpoints/{step}/commit_success.txt" in gcs.list(wd)
    assert not [n for n in gcs.list(wd) if "/lock" in n]  # both leases released
    outs = finish(start(wd, tmp_path, max_steps=step + 2, env=gcs.env))
    for rc, out, err in outs:
        assert rc == 0, err[-3000:]
        assert "resumed from" in err and f"at step {step}" in err
    names = gcs.list(wd)
    for f in ("hf/model.safetensors", "config.json", "train.log", "summary.json"):
        assert f"run/{f}" in names, (f, names)
    steps = [json.loads(x)["step"] for x in gcs.read(f"{wd}/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(1, step + 3))
