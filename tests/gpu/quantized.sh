#!/usr/bin/env bash
# Issue 25 on one CUDA GPU: the quantised frozen LLM (model.precision.llm int8 / nf4, bitsandbytes) trains
# the projection and loads for chat, and the planner's activation estimate is within 15% of
# torch.cuda.max_memory_allocated. The gpu-marked tests of tests/test_quantized_llm.py and
# tests/test_plan.py; writes their summary to $OUT (default gpu-quantized/). About a minute.
#
#   bash tests/gpu/quantized.sh         # needs bitsandbytes: pip install -e .[lowmem]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-quantized}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python -m pytest -q -m gpu -rA tests/test_quantized_llm.py tests/test_plan.py 2>&1 \
    | tail -20 | tee "$OUT/tests.txt"
