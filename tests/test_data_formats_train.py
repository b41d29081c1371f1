"""Sources of each annotation format train on 2 ranks under ZeRO-2, mixed with shards, and resume exactly."""

from __future__ import annotations

import json

import pytest

from tests.format_fixtures import llava_set, sharegpt_set
from tests.launch import deepspeed_cmd, read_jsonl, run

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


def test_every_annotation_format_trains_on_two_ranks_and_resumes_exactly(tmp_path, cache):
    from tests.test_data_formats_hf import _parquet

    annotations = llava_set(str(tmp_path / "llava"), 24, jsonl=True)
    sources = [
        {"name": "synthetic", "ratio": 1},  # the tiny recipe fills in its synthetic shards
        {"name": "llava", "format": "llava", "annotations": annotations, "ratio": 2},
        {"name": "share", "format": "sharegpt", "annotations": sharegpt_set(str(tmp_path / "share"), 12)},
        {"name": "hf", "format": "huggingface", "annotations": _parquet(str(tmp_path / "hf"), 12)},
    ]
    common = ["--deepspeed", "ds_configs/z2.json", "--set", f"data.sources={json.dumps(sources)}",
              "--set", "data.mix=sample", "--set", "data.num_workers=2", "--set", "train.steps=4",
              "--set", "train.log_every=1", "--set", "train.save_every=2"]  # fmt: skip
    full, parts = tmp_path / "full", tmp_path / "parts"
    proc = run(deepspeed_cmd("launchers/pretrain.py", 2, *common, "--set", f"train.output_dir={full}"), cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    first = run(
        deepspeed_cmd(
            "launchers/pretrain.py",
            2,
            *common,
            "--set",
            f"train.output_dir={parts}",
            "--set",
            "train.stop_at=2",
        ),
        cache,
    )
    assert first.returncode == 0, first.stdout[-4000:]
    second = run(
        deepspeed_cmd("launchers/pretrain.py", 2, *common, "--set", f"train.output_dir={parts}"), cache
    )
    assert second.returncode == 0, second.stdout[-4000:]
    assert "resumed from step 2" in second.stdout
    a, b = read_jsonl(str(full / "metrics.jsonl")), read_jsonl(str(parts / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
    assert [r["train/samples_seen"] for r in a] == [16 * s for s in range(1, 5)]


def test_conversations_train_stage2_on_two_ranks_packed_and_resume_exactly(tmp_path, cache):
    llava = llava_set(str(tmp_path / "llava"), 16, turns=3)
    share = sharegpt_set(str(tmp_path / "share"), 8, system="Be brief.")
    sources = [
        {"name": "llava", "format": "llava", "annotations": llava, "ratio": 2},
        {"name": "share", "format": "sharegpt", "annotations": share, "ratio": 1},
    ]
    common = ["--deepspeed", "ds_configs/z2.json", "--set", "data.kind=conversations",
              "--set", f"data.sources={json.dumps(sources)}", "--set", "data.val.samples=0",
              "--set", "train.eval_every=0", "--set", "data.conversation_tokens=160",
              "--set", "data.pack_length=400", "--set", "data.pack_rows=2", "--set", "data.mix=sample",
              "--set", "train.steps=4", "--set", "train.log_every=1", "--set", "train.save_every=2"]  # fmt: skip
    full, parts = tmp_path / "full", tmp_path / "parts"
    proc = run(deepspeed_cmd("launchers/finetune.py", 2, *common, "--set", f"train.output_dir={full}"), cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    first = run(
        deepspeed_cmd(
            "launchers/finetune.py",
            2,
            *common,
            "--set",
            f"train.output_dir={parts}",
            "--set",
            "train.stop_at=2",
        ),
        cache,
    )
    assert first.returncode == 0, first.stdout[-4000:]
    second = run(
        deepspeed_cmd("launchers/finetune.py", 2, *common, "--set", f"train.output_dir={parts}"), cache
    )
    assert second.returncode == 0, second.stdout[-4000:]
    a, b = read_jsonl(str(full / "metrics.jsonl")), read_jsonl(str(parts / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
    assert [r["train/samples_seen"] for r in a] == [r["train/samples_seen"] for r in b]
