"""The training benchmark prints every figure it promises."""

from __future__ import annotations

import re

import pytest

from tests.launch import run

pytestmark = pytest.mark.slow


def test_bench_train_prints_throughput_and_mfu(tmp_path):
    proc = run(
        ["python", "-m", "mgpt4.bench.train", "--recipe", "tiny_stage1", "--steps", "3", "--warmup", "1"],
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout
    for label in ("samples/s", "tokens/s", "TFLOP/s per device", "CPU matmul peak (measured, fp32)"):
        assert re.search(rf"^{re.escape(label)}: [0-9.]+", out, re.M), label
    assert re.search(r"^MFU: [0-9.]+% of [0-9.]+ TFLOP/s", out, re.M)
    assert "params: 0.4M (trainable 4,160)" in out
