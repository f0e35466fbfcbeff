#!/usr/bin/env bash
# The GPU checks of issue 17, prepared for a lent GPU machine and not yet run there: the session
# that wrote them had no GPU (see bench/RESULTS.md). On a machine without ml_collections, put a
# copy of that pure-Python package in .gpu_vendor/ (git-ignored).
#   bash bench/gpu_issue17.sh 1   # kernel numerics, GPT-2 medium bf16 MFU with and without cuDNN
#   bash bench/gpu_issue17.sh 2   # Qwen3-0.6B shape, then the packing bench in bf16
# Writes its logs under $OUT (default /tmp/gpu_out).
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.gpu_vendor" XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
MFU="--dtype bfloat16 --pairs 16 --prompt 256 --completion 256 --steps 5"
if [ "${1:-1}" = 1 ]; then
  timeout 150 python bench/attention_check.py > "$OUT/attention_check.txt" 2>&1
  tail -80 "$OUT/attention_check.txt"
  for attn in xla cudnn; do
    timeout 170 python bench/step_speed.py --model gpt2-medium --modes head,shared $MFU \
      --attention $attn > "$OUT/mfu_gpt2m_$attn.txt" 2>&1
    grep -v "^I1\|^W1" "$OUT/mfu_gpt2m_$attn.txt" | tail -8
  done
else
  for attn in xla cudnn; do
    timeout 110 python bench/step_speed.py --model qwen3-0.6b --modes head $MFU \
      --attention $attn > "$OUT/mfu_qwen3_$attn.txt" 2>&1
    grep -v "^I1\|^W1" "$OUT/mfu_qwen3_$attn.txt" | tail -6
  done
  timeout 200 python bench/packing.py --model gpt2-medium --dtype bfloat16 --pairs 16 \
    --modes pair+buckets,pair+budget,shared+buckets,shared+budget > "$OUT/packing_gpt2m.txt" 2>&1
  grep -v "^I1\|^W1" "$OUT/packing_gpt2m.txt" | grep "^|"
fi
