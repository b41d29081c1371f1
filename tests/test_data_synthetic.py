"""Synthetic data: formats, reuse of the cache, captions that describe the pictures, the command."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np

from mgpt4.data import ensure_synthetic
from mgpt4.data import synthetic as syn


def _small(root):
    return ensure_synthetic(str(root), shards=2, per_shard=3, align=3, min_size=64, max_size=96)


def test_ensure_synthetic_writes_the_official_formats(tmp_path):
    data = _small(tmp_path)
    assert len(data.shards) == 2 and all(os.path.exists(p) for p in data.shards)
    with tarfile.open(data.shards[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"] and len(names) == 9
        meta = json.loads(tar.extractfile("000000000.json").read())
        assert meta["caption"] == tar.extractfile("000000000.txt").read().decode()
        assert 64 <= meta["width"] <= 96 and 64 <= meta["height"] <= 96
    with open(os.path.join(data.align_root, "filter_cap.json")) as f:
        anns = json.load(f)["annotations"]
    assert [a["image_id"] for a in anns] == ["0", "1", "2"]
    assert all(os.path.exists(os.path.join(data.align_root, "image", f"{a['image_id']}.jpg")) for a in anns)
    assert all(len(a["caption"].split()) > 30 for a in anns)  # stage-2 captions are detailed
    assert len(data.captions) == 2 * 3 + 3


def test_ensure_synthetic_is_generated_once(tmp_path, monkeypatch):
    first = _small(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(syn, "write_shards", refuse)
    assert _small(tmp_path) == first
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folders left


def test_captions_describe_the_drawing():
    scene = syn.Scene(background=("black", "black"), shapes=[("large", "yellow", "square", "top left")])
    img = np.asarray(syn.draw(scene, 300, 200, np.random.default_rng(0), noise=2.0)).astype(int)
    assert np.abs(img[40, 60] - syn.COLOURS["yellow"]).max() < 50  # the square's centre: top left
    assert np.abs(img[150, 250] - syn.COLOURS["black"]).max() < 50
    assert syn.short_caption(scene) == "a large yellow square on a black and black background"
    assert "yellow square at the top left" in syn.detailed_caption(scene)


def test_command_line(tmp_path, capsys):
    syn.main(
        [
            "--out",
            str(tmp_path),
            "--shards",
            "1",
            "--per-shard",
            "2",
            "--align",
            "2",
            "--min-size",
            "64",
            "--max-size",
            "80",
            "--quality",
            "90",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 2 and os.path.exists(tmp_path / "shards" / "00000.tar")
    assert os.path.exists(tmp_path / "cc_sbu_align" / "image" / "1.jpg")


def test_the_module_runs_as_a_command_without_a_warning():
    """`python -m mgpt4.data.synthetic` used to warn (RuntimeWarning: found in sys.modules) because the
    package imported it before runpy ran it; -W error turns any warning into a failure."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "mgpt4.data.synthetic", "--help"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: python -m mgpt4.data.synthetic")
