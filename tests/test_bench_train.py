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
    # Every mode on the same captions, in one table, with its ratio to plain.
    rows = {m: re.search(rf"^\| {re.escape(m)} \| off \| ([0-9.]+) \| ([0-9.]+) \| [0-9]+ \| ([0-9.]+)% \| [0-9.]+ \| ([0-9.]+)x", out, re.M)
            for m in ("plain", "packed", "cached", "packed+cached")}  # fmt: skip
    assert all(rows.values()), out[-3000:]
    flops = {m: float(r.group(1)) for m, r in rows.items()}
    padding = {m: float(r.group(3)) for m, r in rows.items()}
    assert float(rows["plain"].group(4)) == 1.0
    # Packed rows count no padding; a cached step counts no ViT or Q-Former.
    assert padding["packed"] < padding["plain"] and padding["packed+cached"] == padding["packed"]
    assert flops["packed+cached"] < flops["cached"] < flops["plain"] and flops["packed"] < flops["plain"]
    # What the cache costs is printed beside what it saves.
    assert re.search(r"^extraction: [0-9]+ samples in [0-9.]+ s = [0-9.]+ samples/s", out, re.M)
    for line in ("one run, plain", "one run, extraction + packed+cached", "three runs on one cache"):
        assert line in out
