#!/usr/bin/env bash
# The GPU checks of issues 29 (long context) and 30 (QLoRA), prepared for a lent GPU machine and
# not yet run there: the sessions that wrote them had no GPU (see bench/RESULTS.md). Missing
# pure-Python packages (ml_collections) go in .gpu_vendor/ (git-ignored), as for gpu_issue17.sh.
#   bash bench/gpu_issue29_30.sh 1   # issue 29: real peak memory and tokens/s by pair length on
#                                    # one GPU (gemma-3-1b with attention="tiled", what auto
#                                    # takes there: its heads of 256 are over cuDNN's 128;
#                                    # Qwen3-0.6B with cuDNN; both with the MLP in tiles of
#                                    # 2048 positions, as auto runs rows of 4096+ tokens),
#                                    # against TRL 1.15's published gemma-3-1b figures
#   bash bench/gpu_issue29_30.sh 2   # issue 30: QLoRA step time against LoRA in bf16, and the
#                                    # 8B real peak of LoRA on a bf16 base against NF4
# Each part is sized to end within 5 minutes on an H100/H200 (timeouts below). Logs go under
# $OUT (default /tmp/gpu_out).
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.gpu_vendor" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
if [ "${1:-1}" = 1 ]; then
  # the longest pair on one device: lengths grow until the device reports out of memory
  timeout 170 python bench/long_context.py --model gemma-3-1b --contexts 1 --run 2 \
    --attention tiled --mlp-tile 2048 --lengths 8192,16384,32768,65536,131072 --lora-rank 16 \
    --budgets 16,40,80 > "$OUT/long_gemma3_1b.txt" 2>&1
  grep "^|" "$OUT/long_gemma3_1b.txt"
  timeout 110 python bench/long_context.py --model qwen3-0.6b --contexts 1 --run 2 \
    --attention cudnn --mlp-tile 2048 --lengths 8192,16384,32768,65536 --lora-rank 16 --lora-only \
    --budgets 16,40,80 > "$OUT/long_qwen3_cudnn.txt" 2>&1
  grep "^|" "$OUT/long_qwen3_cudnn.txt"
else
  # the peers: PEFT LoRA, and PEFT on bitsandbytes' NF4 where bitsandbytes is there (the image
  # has none: carry its wheel, see the device README)
  peers=torch-lora; python -c "import bitsandbytes" 2>/dev/null && peers=$peers,torch-qlora
  timeout 150 python bench/step_speed.py --model qwen3-0.6b --dtype bfloat16 --lora-rank 16 \
    --modes $peers,plain,qlora,qlora-dq,qlora-int8,qlora-fp8 --pairs 8 --prompt 256 --completion 256 \
    --steps 5 --attention cudnn > "$OUT/qlora_speed_qwen3.txt" 2>&1
  grep -v "^I1\|^W1" "$OUT/qlora_speed_qwen3.txt" | grep "^|\|machine"
  timeout 120 python bench/memory.py --model llama-3.1-8b --pairs 1 --seq 2048 --dtype bfloat16 \
    --ref-dtype bfloat16 --remat --lora-rank 16 --lora-only --quantize-base nf4 --double-quant \
    --attention cudnn --run 3 > "$OUT/qlora_memory_8b.txt" 2>&1
  cat "$OUT/qlora_memory_8b.txt"
fi
