#!/usr/bin/env bash
# DPO on a Cloud TPU pod slice: the same train.py on every worker, rerun after preemption until
# the run is done. The workdir is a bucket, so a rerun on new VMs resumes from its checkpoints.
#
#   TPU=my-v5p-64 ZONE=us-east5-a BUCKET=my-bucket RUN=qwen3-dpo CONFIG=configs/qwen3.py \
#     launch/tpu_pod.sh [--dry-run] [--config.key=value ...]
#
# 1. copies this checkout to every worker and installs it there (pip install -e .);
# 2. runs train.py --workdir gs://$BUCKET/$RUN --config.distributed=True on all workers at once
#    (JAX finds the slice's topology itself); the extra arguments go to train.py;
# 3. exit 0: done. Exit 143 (a SIGTERM: maintenance or preemption; every worker saved the same
#    step) or 255 (ssh lost: the VMs went away): waits until the slice is READY again, copies and
#    installs again (new VMs are bare), and reruns. Anything else is an error and stops the loop.
# --dry-run prints the commands instead of running them.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
: "${TPU:?set TPU to the TPU VM (slice) name}"
: "${ZONE:?set ZONE to its zone}"
: "${BUCKET:?set BUCKET to a gs:// bucket the service account of the VMs can write}"
: "${RUN:?set RUN to the name of the run (its folder in the bucket)}"
CONFIG="${CONFIG:-configs/gpt2.py}"
MAX_ATTEMPTS="${MAX_ATTEMPTS:-20}"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
WORKDIR="gs://${BUCKET}/${RUN}"

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

wait_ready() {
  if [[ "$DRY_RUN" == 1 ]]; then
    run gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" --format='value(state)'
    return
  fi
  until [[ "$(gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" \
              --format='value(state)' 2>/dev/null)" == "READY" ]]; do
    echo "tpu_pod.sh: waiting for $TPU to be READY" >&2
    sleep 60
  done
}

install() {
  local tarball="${TMPDIR:-/tmp}/dpo_jax-$TPU.tgz"
  run tar --exclude=./.git --exclude='./.venv*' --exclude=./runs -czf "$tarball" -C "$SRC" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU":dpo_jax.tgz --zone "$ZONE" --worker=all
  run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
    "mkdir -p ~/dpo_jax && tar xzf ~/dpo_jax.tgz -C ~/dpo_jax && cd ~/dpo_jax && pip install -q 'jax[tpu]' && pip install -q -e ."
}

train_cmd="cd ~/dpo_jax && python train.py --config $(printf '%q' "$CONFIG")"
train_cmd+=" --workdir $(printf '%q' "$WORKDIR") --config.distributed=True"
for arg in "$@"; do
  train_cmd+=" $(printf '%q' "$arg")"
done

for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
  wait_ready
  install
  set +e
  run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$train_cmd"
  rc=$?
  set -e
  if [[ "$DRY_RUN" == 1 || "$rc" == 0 ]]; then
    echo "tpu_pod.sh: done; the run is in $WORKDIR" >&2
    exit 0
  fi
  if [[ "$rc" != 143 && "$rc" != 255 ]]; then
    echo "tpu_pod.sh: train.py failed (exit $rc); its last lines are in $WORKDIR/train.log" >&2
    exit "$rc"
  fi
  echo "tpu_pod.sh: stopped (exit $rc: preempted or maintenance); rerunning (attempt" \
       "$((attempt + 1)) of $MAX_ATTEMPTS)" >&2
done
echo "tpu_pod.sh: gave up after $MAX_ATTEMPTS attempts" >&2
exit 1
