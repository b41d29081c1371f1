#!/usr/bin/env bash
# The stage-1 GPU benchmark: a 7B-shaped MiniGPT-4 (ViT-g, Q-Former, Vicuna-7B sizes) with random weights,
# bf16, ZeRO-2 on one GPU; every mode (plain, packed, cached, packed+cached), without and with gradient
# checkpointing, then compiled (`train.compile`: CUDA graphs); then the quantised-LLM checks
# (tests/gpu/quantized.sh's tests) and the server's batching benchmark. Writes what it measured to $OUT (default gpu-bench/):
# one log per part, bench.json, table.md, and parts.txt (each part's exit status and seconds), even
# when a part fails or hits its timeout; the exit status is then 1. Under 8 minutes on one H100.
#
#   bash tests/gpu/bench.sh                  # on a machine with one CUDA GPU
#   BATCH=32 PACK_ROWS=2 bash tests/gpu/bench.sh
#   bash tests/gpu/bench.sh --cpu            # every part at tiny size on the CPU (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"
: > "$OUT/parts.txt"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mgpt4/torch_extensions}"
export TOKENIZERS_PARALLELISM=false
FAILED=0

# part NAME SECONDS COMMAND...: run one part under its own timeout, its output in $OUT/NAME.log; a failed
# or timed-out part is recorded and the next part runs.
part() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/parts.txt"
  if [ $rc -ne 0 ]; then
    FAILED=1
    tail -20 "$OUT/$name.log"
  fi
  return 0
}

if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" \
    || echo "no nvidia-smi" > "$OUT/device.txt"
  # FlashAttention-2 when installed (packed rows run its varlen kernel); else SDPA, per sample.
  ATTN=sdpa
  if python -c "import flash_attn" 2>/dev/null; then ATTN=flash_attention_2; fi
  BENCH=(deepspeed --num_gpus 1 --module mgpt4.bench.train --recipe stage1_vicuna7b --random-weights
         --deepspeed ds_configs/z2.json --set train.precision=bf16 --set "data.batch_size=${BATCH:-64}"
         --set data.num_workers=6 --set model.attn_implementation=$ATTN --pack-rows "${PACK_ROWS:-2}"
         --steps "${STEPS:-10}" --warmup 3 --extract-batch 128)
  # Compiling a 7B-shaped step takes a minute or more per shape: the two ends (plain, packed+cached), each
  # also eager in the same run, so the gain is measured against the same machine state.
  COMPILED=(--modes plain,packed+cached --compile both --steps 6 --warmup 1 --rounds 2)
  SERVE=(python -m mgpt4.bench.serve --device cuda --requests 32)   # the tiny model: the batching gain
  TIMEOUTS=(50 170 170 40 30)   # 460 s in all: under 8 minutes
else
  echo "CPU $(nproc) cores" > "$OUT/device.txt"
  ATTN=sdpa
  BENCH=(python -m mgpt4.bench.train --recipe tiny_stage1 --steps 2 --warmup 1 --rounds 1)
  COMPILED=(--modes packed+cached --compile both)  # inductor on 2 cores: minutes per compiled mode
  SERVE=(python -m mgpt4.bench.serve --device cpu --requests 4
         --concurrency 1 4 --max-tokens 4)
  TIMEOUTS=(120 400 600 240 120)
fi
# PART_TIMEOUTS="50 170 170 40 30" overrides the parts' timeouts (seconds, in order).
if [ -n "${PART_TIMEOUTS:-}" ]; then read -r -a TIMEOUTS <<< "$PART_TIMEOUTS"; fi
echo "attention: $ATTN" >> "$OUT/device.txt"
cat "$OUT/device.txt"

# 1. Packed rows equal unpacked ones on this device too (loss and projection gradient, fp32); on the CPU
#    the gpu-marked tests skip, which still proves the command.
part packing-test "${TIMEOUTS[0]}" python -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_model_packing.py tests/test_packed_attention.py tests/test_compile.py
# 2. Every mode, without and with gradient checkpointing.
part bench "${TIMEOUTS[1]}" "${BENCH[@]}" --checkpointing both --json "$OUT/bench.json"
# 3. Compiled and eager side by side, without checkpointing.
part bench-compiled "${TIMEOUTS[2]}" "${BENCH[@]}" "${COMPILED[@]}" --checkpointing off \
  --json "$OUT/bench-compiled.json"
# 4. The quantised frozen LLM (int8 / nf4) trains and loads, and the planner's estimate holds on the GPU
#    (skipped without CUDA and bitsandbytes: pip install -e .[lowmem]).
part quantized "${TIMEOUTS[3]}" python -m pytest -q -p no:cacheprovider -m gpu -rA \
  tests/test_quantized_llm.py tests/test_plan.py
# 5. The server: requests/s and tokens/s, batched against one request at a time.
part serve "${TIMEOUTS[4]}" "${SERVE[@]}"

{
  echo "Measured $(date -u +%Y-%m-%d) on $(head -1 "$OUT/device.txt" | cut -d, -f1), attention $ATTN:"
  for name in bench bench-compiled serve; do
    echo
    echo "$name ($(grep "^$name " "$OUT/parts.txt"))"
    grep -E '^\||^(one at a time|batched|speedup)' "$OUT/$name.log" || echo "(no table: see $OUT/$name.log)"
  done
} > "$OUT/table.md"
cat "$OUT/table.md"
exit $FAILED
