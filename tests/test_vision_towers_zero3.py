"""A transformers vision tower under ZeRO-3: the tower is partitioned like the LLM, the losses equal
ZeRO-2's, and a run stopped after its first step resumes on the same loss curve."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.launch import deepspeed_cmd, read_jsonl, run

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


def _run(out, cache: str, ds: str, *extra: str):
    sets = [
        f"train.output_dir={out}",
        "train.steps=2",
        "train.log_every=1",
        "train.save_every=1",
        "train.eval_every=0",
        "data.val.samples=0",
        "model.projector=mlp2x_gelu",
        *extra,
    ]
    cmd = deepspeed_cmd(
        "launchers/pretrain.py",
        2,
        "--recipe",
        "tiny_tower_stage1",
        "--deepspeed",
        f"ds_configs/{ds}",
        *(a for s in sets for a in ("--set", s)),
    )
    proc = run(cmd, cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def test_a_tower_run_under_zero3_equals_zero2_and_resumes_exactly(tmp_path):
    cache = str(tmp_path / "cache")
    _run(tmp_path / "z2", cache, "z2.json")
    _run(tmp_path / "z3", cache, "z3.json", "train.stop_at=1")
    resumed = _run(tmp_path / "z3", cache, "z3.json")
    assert "resumed from step 1" in resumed.stdout
    report = json.loads((tmp_path / "z3" / "engine.json").read_text())
    assert report["zero_stage"] == 3 and report["world_size"] == 2
    shards = report["params_per_rank"]["visual_encoder"]
    assert len(shards) == 2 and shards[0] > 0 and shards[0] == shards[1]  # the tower is split, not copied
    a = read_jsonl(str(tmp_path / "z2" / "metrics.jsonl"))
    b = read_jsonl(str(tmp_path / "z3" / "metrics.jsonl"))
    assert [r["step"] for r in a] == [1, 2] and [r["step"] for r in b] == [1, 2]
    np.testing.assert_allclose([r["train/loss"] for r in b], [r["train/loss"] for r in a], rtol=1e-5)
