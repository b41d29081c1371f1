"""val/loss through the real launchers: equal to the model's own loss over the held-out samples, computed
here from the checkpoint of the same step, on 1 and 2 ranks under ZeRO-2 and ZeRO-3; unchanged by a
resume in between."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

from tests.launch import deepspeed_cmd, read_jsonl, run

pytestmark = pytest.mark.slow

SAMPLES = 10  # not a multiple of ranks x batch: padded rows and an empty batch are exercised
COMMON = [
    "--set", "train.steps=4", "--set", "train.log_every=1", "--set", "train.eval_every=2",
    "--set", "train.save_every=2", "--set", "train.keep_last=5",
    "--set", f"data.val.samples={SAMPLES}", "--set", "data.val.batch_size=3",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


def _val(out) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_jsonl(str(out / "metrics.jsonl")) if "val/loss" in r}


def _direct_loss(out, step: int) -> float:
    """The loss of the checkpoint's model over the first SAMPLES held-out samples, one at a time,
    weighted by answer tokens: read from the shard here, not through mgpt4.data.heldout."""
    from mgpt4.config import ModelConfig
    from mgpt4.data.transforms import ImageTransform, clean_caption, normalize_uint8
    from mgpt4.model import from_config
    from mgpt4.strict_config import from_dict
    from mgpt4.tokenizer import encode_answers

    ckpt = out / "checkpoints" / f"step_{step:08d}"
    saved = json.loads((ckpt / "config.json").read_text())
    cfg = from_dict(ModelConfig, saved["model"], "model")
    cfg.weights.proj = str(ckpt / "llama_proj.pth")
    model = from_config(cfg).eval()
    size, t = cfg.vision.image_size, cfg.text
    transform = ImageTransform(size, train=False)
    total, tokens = 0.0, 0
    with tarfile.open(saved["data"]["val"]["shards"][0]) as tar:
        keys = list(dict.fromkeys(n.split(".")[0] for n in tar.getnames()))[:SAMPLES]
        for key in keys:
            caption = clean_caption(tar.extractfile(f"{key}.txt").read().decode())
            pixels = torch.empty(3, size, size, dtype=torch.uint8)
            transform(tar.extractfile(f"{key}.jpg").read(), None, pixels)
            with torch.no_grad():
                loss = float(model.loss(normalize_uint8(pixels[None]), [caption]))
            n = int(encode_answers(model.tokenizer, [caption], t.end_sym, t.max_txt_len)[1].sum())
            total, tokens = total + loss * n, tokens + n
    return total / tokens


def test_one_rank_equals_the_models_loss_and_a_resume_changes_nothing(tmp_path, cache):
    full, parts = tmp_path / "full", tmp_path / "parts"
    launcher = ["python", "launchers/pretrain.py", *COMMON]
    proc = run([*launcher, "--set", f"train.output_dir={full}"], cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "validation: val/loss" in proc.stdout and "not counted in the throughput" in proc.stdout
    val = _val(full)
    assert sorted(val) == [2, 4]
    for step, loss in val.items():
        assert loss == pytest.approx(_direct_loss(full, step), abs=1e-6), step
    rows = read_jsonl(str(full / "metrics.jsonl"))
    assert all(r["perf/eval_s"] > 0 for r in rows if "val/loss" in r)
    for stop in ([*launcher, "--set", "train.stop_at=3"], launcher):
        proc = run([*stop, "--set", f"train.output_dir={parts}"], cache)
        assert proc.returncode == 0, proc.stdout[-4000:]
    assert "resumed from step 3" in proc.stdout
    assert _val(parts) == val  # the same steps, the same values


@pytest.mark.multirank
@pytest.mark.parametrize("ds_json", ["z2.json", "z3.json"])
def test_two_ranks_reduce_to_the_models_loss(tmp_path, cache, ds_json):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(
        "launchers/pretrain.py", 2, "--deepspeed", f"ds_configs/{ds_json}", *COMMON,
        "--set", f"train.output_dir={out}",
    )  # fmt: skip
    proc = run(cmd, cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    val = _val(out)
    assert sorted(val) == [2, 4]
    for step, loss in val.items():
        assert loss == pytest.approx(_direct_loss(out, step), abs=1e-6), step
