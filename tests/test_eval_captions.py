"""`python -m mgpt4.eval captions` end to end on a tiny checkpoint and drawn images: predictions,
metrics, TensorBoard, two ranks, and bad input that stops before any model loads."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import numpy as np
import pytest

from mgpt4.data.synthetic import _scene, draw, short_caption
from mgpt4.eval.__main__ import main
from mgpt4.eval.captions import METRICS_FILE, PREDICTIONS_FILE
from mgpt4.eval.scores import METRICS
from tests.chat_fixtures import readable_tiny_model, write_checkpoint
from tests.curate_fixtures import one_torch_thread
from tests.launch import REPO, free_port, launcher_env

N_IMAGES = 5


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    return write_checkpoint(readable_tiny_model(tokenizer), str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Drawn scenes as JPEGs and their captions in the COCO format (file_name without folder, as COCO)."""
    root = tmp_path_factory.mktemp("coco")
    folder = root / "val"
    folder.mkdir()
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": []}
    for i in range(N_IMAGES):
        scene = _scene(rng)
        name = f"COCO_val_{i:012d}.jpg"
        draw(scene, 80, 64, rng).save(folder / name)
        coco["images"].append({"id": 100 + i, "file_name": name})
        coco["annotations"].append({"image_id": 100 + i, "id": 2 * i, "caption": short_caption(scene)})
        coco["annotations"].append({"image_id": 100 + i, "id": 2 * i + 1, "caption": f"a picture number {i}"})
    refs = root / "captions_val.json"
    refs.write_text(json.dumps(coco))
    return str(folder), str(refs)


def _args(run_dir, images, out, *extra):
    folders, refs = images
    folders = [folders] if isinstance(folders, str) else folders
    return ["captions", "--checkpoint", run_dir, "--images", *folders, "--references", refs, "--out", str(out),
            "--batch-size", "2", "--num-workers", "0", "--no-progress", "--device", "cpu", *extra]  # fmt: skip


def _rows(out) -> list[dict]:
    with open(os.path.join(out, PREDICTIONS_FILE)) as f:
        return [json.loads(line) for line in f]


def test_captions_scores_a_checkpoint_and_logs_to_its_run(run_dir, images, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "eval"
    assert main(_args(run_dir, images, out, "--tensorboard")) == 0
    rows = _rows(out)
    assert [r["image_id"] for r in rows] == [100 + i for i in range(N_IMAGES)]
    assert all(r["caption"] and "\n" not in r["caption"] for r in rows)
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert all(0 <= metrics[m] <= (10 if m == "CIDEr" else 1) for m in METRICS)
    assert metrics["images"] == N_IMAGES and metrics["empty_predictions"] == 0 and metrics["step"] == 10
    assert metrics["prompt"] == "<ImageHere>" and metrics["decoding"]["sample"] is False
    assert metrics["decoding"]["max_new_tokens"] == 32  # the checkpoint's max_txt_len
    table = capsys.readouterr().out
    assert all(m in table for m in METRICS) and f"({N_IMAGES} images)" in table
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    cider = acc.Scalars("captions/CIDEr")
    assert [(e.step, e.value) for e in cider] == [(10, pytest.approx(metrics["CIDEr"], rel=1e-6))]
    # Scoring the written predictions again gives the same numbers (no model needed).
    again = tmp_path / "again.json"
    assert main(["score", "--predictions", str(out / PREDICTIONS_FILE), "--references", images[1],
                 "--out", str(again)]) == 0  # fmt: skip
    assert json.loads(again.read_text())["BLEU-4"] == metrics["BLEU-4"]


def test_empty_and_unreadable_predictions_are_counted_and_scored_as_empty(
    run_dir, images, tmp_path, monkeypatch
):
    from mgpt4.model.minigpt4 import MiniGPT4

    refs = json.loads(pathlib.Path(images[1]).read_text())
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    refs["images"].append({"id": 999, "file_name": "broken.jpg"})
    refs["annotations"].append({"image_id": 999, "caption": "a broken picture"})
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    real, calls = MiniGPT4.generate, []

    def first_reply_empty(self, *args, **kwargs):
        replies = real(self, *args, **kwargs)
        calls.append(len(replies))
        return ["", *replies[1:]] if len(calls) == 1 else replies

    monkeypatch.setattr(MiniGPT4, "generate", first_reply_empty)
    out = tmp_path / "eval"
    assert main(_args(run_dir, ([images[0], str(extra)], str(tmp_path / "refs.json")), out)) == 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["images"] == N_IMAGES + 1
    assert metrics["empty_predictions"] == 1 and metrics["unreadable_images"] == 1
    rows = {r["image_id"]: r for r in _rows(out)}
    assert rows[999]["caption"] == "" and "broken.jpg" in rows[999]["error"]
    assert rows[100]["caption"] == ""


@pytest.mark.parametrize(
    "change,message",
    [
        ("extra_image", r"1 image\(s\) of .* have no reference caption in .*: stray"),
        ("missing_image", r"1 image\(s\) referenced in .* are not among .*: COCO_val_000000000004"),
        ("bad_refs", r"no 'annotations' list; expected the COCO captions format"),
    ],
)
def test_bad_input_stops_before_the_model_loads(
    run_dir, images, tmp_path, capsys, monkeypatch, change, message
):
    import mgpt4.inference as inference

    monkeypatch.setattr(inference, "load_model", lambda source: pytest.fail("the model was loaded"))
    folder = tmp_path / "val"
    folder.mkdir()
    names = sorted(os.listdir(images[0]))
    for name in names[:-1] if change == "missing_image" else names:
        os.symlink(os.path.join(images[0], name), folder / name)
    if change == "extra_image":
        os.symlink(os.path.join(images[0], names[0]), folder / "stray.jpg")
    refs = images[1]
    if change == "bad_refs":
        refs = str(tmp_path / "refs.json")
        with open(refs, "w") as f:
            json.dump([{"image_id": 1, "caption": "x"}], f)
    assert main(_args(run_dir, (str(folder), refs), tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_through_the_deepspeed_launcher_give_the_same_captions(run_dir, images, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(run_dir, images, one)) == 0
    env = launcher_env(str(tmp_path / "cache"))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mgpt4.eval",
           *_args(run_dir, images, two)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "captions: 3 images on rank 0" in output and output.count("BLEU-4") == 1
    assert _rows(two) == _rows(one)
    a, b = (json.loads((d / METRICS_FILE).read_text()) for d in (one, two))
    assert all(a[m] == b[m] for m in METRICS)
