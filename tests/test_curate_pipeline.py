"""The whole pipeline on a tiny model: images -> describe -> fix (a local test server) -> filter -> cc_sbu_align."""

from __future__ import annotations

import json
import os
import threading

import pytest
from PIL import Image

from mgpt4.curate.__main__ import main
from mgpt4.curate.store import read_store
from tests.curate_fixtures import (
    ChatServer,
    completion,
    draw_images,
    make_stage1_checkpoint,
    one_torch_thread,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


ENGLISH = (
    "The picture shows {n} colourful shapes on a plain background. A large circle sits near the top "
    "left corner, and a small square is drawn below it with a thin dark outline. The colours are bright "
    "and the edges of the shapes are sharp."
)


def test_describe_fix_filter_end_to_end(tmp_path, tiny_cfg, tokenizer, monkeypatch, capsys):
    monkeypatch.setenv("MGPT4_TEST_KEY", "sk-e2e-secret")
    ckpt = make_stage1_checkpoint(str(tmp_path / "model"), tiny_cfg, tokenizer)
    images = tmp_path / "images"
    draw_images(str(images), 6, png_every=3)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    work = tmp_path / "work"

    args = ["describe", "--images", str(images), "--out", str(work / "describe"), "--checkpoint", ckpt]
    args += ["--max-new-tokens", "6", "--batch-size", "4", "--num-workers", "2", "--no-progress"]
    assert main(args) == 0
    described = read_store(str(work / "describe"))
    assert sorted(described.failed()) == ["broken"]
    assert len(described.done()) == 6 and all(r["text"] for r in described.done().values())

    lock = threading.Lock()
    served = {"n": 0}

    def respond(req, _):
        with lock:
            k = served["n"]
            served["n"] += 1
        if k == 0:
            return 429, {"Retry-After": "0"}, b'{"error": {"message": "slow down"}}'
        if k == 1:
            return 200, {}, completion("I'm sorry, but I cannot make sense of this paragraph.")
        if k == 2:
            return 200, {}, completion("The paragraph is already correct.")
        return 200, {}, completion(ENGLISH.format(n=k))

    with ChatServer(respond) as server:
        args = [
            "fix",
            "--input",
            str(work / "describe"),
            "--out",
            str(work / "fix"),
            "--base-url",
            server.url,
        ]
        args += ["--model", "test", "--api-key-env", "MGPT4_TEST_KEY", "--backoff", "0.001", "--no-progress"]
        assert main(args) == 0
    assert served["n"] == 7  # 6 descriptions, one of them asked twice after the 429
    assert len(read_store(str(work / "fix")).done()) == 6

    out = tmp_path / "cc_sbu_align"
    assert main(["filter", "--input", str(work / "fix"), "--out", str(out), "--no-progress"]) == 0
    with open(out / "filter_cap.json") as f:
        anns = json.load(f)["annotations"]
    assert len(anns) == 4
    assert all(isinstance(a["image_id"], str) and a["caption"].startswith("The picture shows") for a in anns)
    assert sorted(os.listdir(out / "image")) == sorted(f"{a['image_id']}.jpg" for a in anns)
    for a in anns:
        with Image.open(out / "image" / f"{a['image_id']}.jpg") as im:
            assert im.format == "JPEG"
    with open(out / "rejects.jsonl") as f:
        rules = sorted(r["rule"] for r in map(json.loads, f))
    assert rules == ["already_correct", "describe_failed", "refusal"]
    assert "sk-e2e-secret" not in capsys.readouterr().err
