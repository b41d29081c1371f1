#!/usr/bin/env bash
# The stage-1 GPU benchmark: a 7B-shaped MiniGPT-4 (ViT-g, Q-Former, Vicuna-7B sizes) with random weights,
# bf16, ZeRO-2 on one GPU; every mode (plain, packed, cached, packed+cached), without and with gradient
# checkpointing. Prints samples/s, MFU and peak memory as a table and writes it to $OUT (default
# gpu-bench/): bench.txt, bench.json, table.md. About 3-5 minutes on one H100/H200; the timeout is 8.
#
#   bash tests/gpu/bench.sh                  # on a machine with one CUDA GPU
#   BATCH=32 PACK_ROWS=2 bash tests/gpu/bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-bench}
BATCH=${BATCH:-64}          # samples per step: the official per-GPU batch
PACK_ROWS=${PACK_ROWS:-2}   # packed rows per step, each sized to hold BATCH/PACK_ROWS mean samples
STEPS=${STEPS:-10}
mkdir -p "$OUT"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mgpt4/torch_extensions}"
export TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# FlashAttention-2 when it is installed (packed rows then run its varlen kernel); else SDPA with a block mask.
ATTN=sdpa
if python -c "import flash_attn" 2>/dev/null; then ATTN=flash_attention_2; fi
echo "attention: $ATTN" | tee -a "$OUT/gpu.txt"

# Packed rows equal unpacked ones on this GPU too (loss and projection gradient, fp32).
timeout 120 python -m pytest -q -m gpu tests/test_model_packing.py 2>&1 | tail -3 | tee "$OUT/packing-test.txt"

timeout 460 deepspeed --num_gpus 1 --module mgpt4.bench.train --recipe stage1_vicuna7b --random-weights \
    --deepspeed ds_configs/z2.json --set train.precision=bf16 --set data.batch_size="$BATCH" \
    --set data.num_workers=6 --set model.attn_implementation="$ATTN" --pack-rows "$PACK_ROWS" \
    --checkpointing both --steps "$STEPS" --warmup 3 --extract-batch 128 --json "$OUT/bench.json" \
    2>&1 | tee "$OUT/bench.log"
grep -v '^\[' "$OUT/bench.log" | sed -n '/^recipe:/,$p' > "$OUT/bench.txt"
{
  echo "Measured $(date -u +%Y-%m-%d) on $(head -1 "$OUT/gpu.txt" | cut -d, -f1), attention $ATTN:"
  echo
  grep '^|' "$OUT/bench.txt"
} > "$OUT/table.md"
cat "$OUT/table.md"
