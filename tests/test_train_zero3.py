"""ZeRO-3 with every parameter partitioned, at tiny size: training, validation, sample captions and the
projection's export read the same values as the unpartitioned model.

At tiny size every tensor is below `stage3_param_persistence_threshold` (100K elements in z3.json), so
z3.json itself never partitions the frozen ViT or Q-Former for good: each is gathered once and kept. At
real size it does (a ViT-g's `pos_embed` has 362K elements), and a run used to die at its first sample
step, which read `pos_embed` and `query_tokens` outside the engine's forward, before saving its checkpoint.
Here a threshold of 0 and a small `stage3_max_live_parameters` partition everything at tiny size.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tests.launch import REPO, deepspeed_cmd, read_jsonl, run
from tests.test_train_validation import SAMPLES, _direct_loss, _val

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

STEPS = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


def partition_everything(path) -> str:
    """ds_configs/z3.json with nothing persistent and at most 1000 elements gathered at a time."""
    with open(f"{REPO}/ds_configs/z3.json", encoding="utf-8") as f:
        ds = json.load(f)
    ds["zero_optimization"].update(
        {
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "stage3_max_live_parameters": 1000,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
        }
    )
    path.write_text(json.dumps(ds))
    return str(path)


def _captions_of(ckpt, prompt_instructions: list[str]) -> list[str]:
    """The sample captions of checkpoint `ckpt`'s model on its sample images, one process, no ZeRO:
    what `trainer.write_samples` writes, computed here from the files."""
    from mgpt4.config import ModelConfig
    from mgpt4.model import from_config
    from mgpt4.model.prompts import IMAGE_PLACEHOLDER
    from mgpt4.strict_config import from_dict

    cfg = from_dict(ModelConfig, json.loads((ckpt / "config.json").read_text())["model"], "model")
    cfg.weights.proj = str(ckpt / "llama_proj.pth")
    model = from_config(cfg).eval()
    images = torch.load(ckpt / "run_state.pt", weights_only=True)["sample_images"]
    prompt = model.wrap_instruction(prompt_instructions[0]) if prompt_instructions else IMAGE_PLACEHOLDER
    with torch.no_grad():
        captions = model.generate_from_embeds(
            [model.encode_img(images)], prompt, max_new_tokens=cfg.text.max_txt_len
        )
    return [c.split("\n")[0].strip() for c in captions]


def test_everything_partitioned_trains_validates_samples_and_exports(tmp_path, cache):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(
        "launchers/pretrain.py", 2, "--deepspeed", partition_everything(tmp_path / "z3_all.json"),
        "--set", f"train.output_dir={out}", "--set", f"train.steps={STEPS}", "--set", "train.log_every=1",
        "--set", "train.eval_every=1", "--set", "train.save_every=1", "--set", "train.sample_every=1",
        "--set", f"data.val.samples={SAMPLES}", "--set", "data.val.batch_size=3",
    )  # fmt: skip
    proc = run(cmd, cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "not written" not in proc.stdout, proc.stdout[-4000:]

    # Every part is split over the two ranks: frozen ViT, ln_vision, Q-Former and its query tokens, the
    # trainable projection and the frozen LLM.
    report = json.loads((out / "engine.json").read_text())
    from mgpt4.config import ModelConfig
    from mgpt4.model import build_model
    from mgpt4.strict_config import from_dict

    ckpt = out / "checkpoints" / f"step_{STEPS:08d}"
    saved = json.loads((ckpt / "config.json").read_text())
    model = build_model(from_dict(ModelConfig, saved["model"], "model"))
    full = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    full["query_tokens"] = model.query_tokens.numel()
    per_rank = report["params_per_rank"]
    assert set(per_rank) == set(full)
    for name, numel in full.items():
        # A shard is the tensor's elements over the ranks, rounded up per tensor.
        assert sum(per_rank[name]) >= numel and all(n < numel for n in per_rank[name]), (name, per_rank[name])

    # Training and validation: val/loss equals the loss of the saved projection in the whole model.
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in rows)
    val = _val(out)
    assert sorted(val) == [1, 2]
    for step, loss in val.items():
        assert loss == pytest.approx(_direct_loss(out, step), abs=1e-6), step

    # The export: the full fp32 projection, the same as the run state's.
    exported = torch.load(ckpt / "llama_proj.pth", weights_only=True)["model"]
    state = torch.load(ckpt / "run_state.pt", weights_only=True)
    assert exported["llama_proj.weight"].shape == model.llama_proj.weight.shape
    for key, value in exported.items():
        assert torch.equal(value, state["trainable"]["params"][key]), key

    # Sample captions: written at every step, after that step's checkpoint; the last ones are what
    # the checkpoint's model says about the same images.
    logged = re.findall(r"mgpt4\.train\.metrics:   sample (\d+): (.*)", proc.stdout)
    assert len(logged) == STEPS * 4 and [int(i) for i, _ in logged[-4:]] == [0, 1, 2, 3]
    last_save = proc.stdout.rindex(f"saved {ckpt}")
    assert proc.stdout.index("sample 0:", last_save) > last_save
    assert [c.strip() for _, c in logged[-4:]] == _captions_of(ckpt, saved["model"]["text"]["instructions"])
