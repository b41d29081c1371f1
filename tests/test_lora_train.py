"""Stage 2 with LoRA (`model.lora`) through the real launcher: 2 ranks under ZeRO-2 and ZeRO-3, the
checkpoint (projection + adapters, a PEFT folder that peft loads on its own), exact resume, and the
refusal of a LoRA run by a run without LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.launch import deepspeed_cmd, read_jsonl, run

pytestmark = [pytest.mark.slow]

LORA = ["--set", "model.lora.rank=4", "--set", "optim.lora_lr=0.002"]
PROJ_NUMEL = 64 * 64 + 64
# tiny: 2 layers x (q_proj, v_proj) x (A 4x64 + B 64x4)
LORA_NUMEL = 2 * 2 * (4 * 64 + 64 * 4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


def _adapters(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["trainable"]["params"].items() if ".lora_" in k}


@pytest.mark.multirank
@pytest.mark.parametrize("ds_json", ["z2.json", "z3.json"])
def test_two_ranks_train_the_projection_and_the_adapters(tmp_path, cache, ds_json):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(
        "launchers/finetune.py", 2, "--deepspeed", f"ds_configs/{ds_json}", *LORA,
        "--set", f"train.output_dir={out}", "--set", "train.steps=2", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", "--set", "data.val.samples=0",
    )  # fmt: skip
    proc = run(cmd, cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = json.loads((out / "engine.json").read_text())
    assert report["zero_stage"] == int(ds_json[1]) and report["world_size"] == 2
    assert report["trainable_params"] == PROJ_NUMEL + LORA_NUMEL
    # Adam's state covers exactly the projection and the adapters, split over the ranks.
    assert sum(report["optimizer_state_numel_per_rank"]) == PROJ_NUMEL + LORA_NUMEL
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in rows)

    ckpt = out / "checkpoints" / "step_00000002"
    state = torch.load(ckpt / "run_state.pt", weights_only=True)
    params = state["trainable"]["params"]
    adapters = _adapters(state)
    # The checkpoint holds the projection and the adapters only, with their Adam moments.
    assert set(params) == {"llama_proj.weight", "llama_proj.bias", *adapters}
    assert sum(v.numel() for v in adapters.values()) == LORA_NUMEL
    assert set(state["trainable"]["exp_avg"]) == set(params)
    # B starts at zero; two steps at lora_lr moved it.
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_B." in k)

    # The PEFT folder beside llama_proj.pth holds the same tensors, and peft loads it on its own.
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from mgpt4.model.lora import peft_key

    saved = load_file(ckpt / "lora_adapter" / "adapter_model.safetensors")
    assert saved.keys() == {peft_key(k) for k in adapters}
    assert all(torch.equal(saved[peft_key(k)], v) for k, v in adapters.items())
    from transformers import AutoModelForCausalLM

    llm_folder = json.loads((ckpt / "config.json").read_text())["model"]["weights"]["llm"]
    llm = AutoModelForCausalLM.from_pretrained(llm_folder, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(llm, str(ckpt / "lora_adapter"))
    own = dict(loaded.named_parameters())
    for k, v in adapters.items():
        # llm.<layer>.lora_A.default.weight -> base_model.model.<layer>.lora_A.default.weight
        assert torch.equal(own["base_model.model." + k.removeprefix("llm.")], v), k


def test_exact_resume_and_the_refusal_of_a_run_without_lora(tmp_path, cache):
    plain = ["launchers/finetune.py", "--set", "train.steps=4", "--set", "train.log_every=1",
             "--set", "train.save_every=2", "--set", "train.eval_every=0", "--set", "data.val.samples=0"]  # fmt: skip
    common = [*plain, *LORA]
    full, parts = tmp_path / "full", tmp_path / "parts"
    proc = run(["python", *common, "--set", f"train.output_dir={full}"], cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    first = run(["python", *common, "--set", f"train.output_dir={parts}", "--set", "train.stop_at=2"], cache)
    assert first.returncode == 0, first.stdout[-4000:]

    # The same folder without LoRA: refused before anything is built, naming the field.
    refused = run(["python", *plain, "--set", f"train.output_dir={parts}"], cache)
    assert refused.returncode != 0
    assert "model.lora.rank is 4 at the checkpoint and 0 in this run (LoRA off)" in refused.stdout, (
        refused.stdout[-3000:]
    )
    # And with another LoRA setting.
    changed = run(
        ["python", *common, "--set", "model.lora.alpha=8", "--set", f"train.output_dir={parts}"], cache
    )
    assert changed.returncode != 0 and "model.lora.alpha is 16.0 at the checkpoint and 8" in changed.stdout

    second = run(["python", *common, "--set", f"train.output_dir={parts}"], cache)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "resumed from step 2" in second.stdout
    a, b = read_jsonl(str(full / "metrics.jsonl")), read_jsonl(str(parts / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["train/loss"] == rb["train/loss"], (ra["step"], ra["train/loss"], rb["train/loss"])
    sa = torch.load(full / "checkpoints" / "step_00000004" / "run_state.pt", weights_only=True)
    sb = torch.load(parts / "checkpoints" / "step_00000004" / "run_state.pt", weights_only=True)
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert sa["trainable"][key].keys() == sb["trainable"][key].keys()
        assert all(
            torch.equal(sa["trainable"][key][k], sb["trainable"][key][k]) for k in sa["trainable"][key]
        )
    assert _adapters(sa)
