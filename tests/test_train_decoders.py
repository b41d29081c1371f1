"""Each Hugging Face decoder trains through the real launcher on 2 ranks under ZeRO-2 and ZeRO-3 (the
LLM loaded partitioned), then generates from the checkpoint and loads its exported projection back.

The LLaMA folder trains the official LLaMA-2 variant (no Q-Former, Llama-2-Chat, answers ending in
`</s>`); Mistral and Qwen2 train the Q-Former path in their tokenizers' chat templates (Qwen2 without BOS).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TOKENIZER_CORPUS
from tests.decoder_folders import ARCHITECTURES, write_decoder_folder
from tests.launch import deepspeed_cmd, read_jsonl, run
from tests.official_files import write_tiny_vision_files

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):

    root = tmp_path_factory.mktemp("decoders")
    out = write_tiny_vision_files(str(root))
    for arch in ARCHITECTURES:
        out[arch] = write_decoder_folder(str(root), arch, tokenizer, TOKENIZER_CORPUS)
    return out


def overrides(arch: str, files: dict) -> list[str]:
    """tiny_stage2 on the folder's LLM: sizes from its config.json (model.llm left empty), the
    instruction form and answer end of the template (None: the template's)."""
    sets = [
        f"model.weights.llm={files[arch]}",
        f"model.weights.eva_vit={files['eva_vit']}",
        "model.llm={}",
        "model.text.prompt_template=null",
        "model.text.end_sym=null",
    ]
    if arch == "llama":
        sets += ["model.qformer=null", "model.weights.blip2=null", "model.text.template=llama2_chat"]
    else:
        sets += [f"model.weights.blip2={files['blip2']}", "model.text.template=chat_template"]
    return sets


@pytest.mark.parametrize("ds_json", ["z2.json", "z3.json"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoder_trains_on_two_ranks_then_generates_and_exports(tmp_path, cache, files, arch, ds_json):
    from mgpt4.config import ModelConfig
    from mgpt4.model import from_config
    from mgpt4.strict_config import from_dict

    out = tmp_path / "run"
    sets = [*overrides(arch, files), f"train.output_dir={out}", "train.steps=2", "train.log_every=1"]
    proc = run(
        deepspeed_cmd(
            "launchers/finetune.py",
            2,
            "--deepspeed",
            f"ds_configs/{ds_json}",
            *(a for s in sets for a in ("--set", s)),
        ),
        cache,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/loss"] > 0 for r in rows)
    report = json.loads((out / "engine.json").read_text())
    assert report["zero_stage"] == int(ds_json[1])
    if ds_json == "z3.json":  # loaded partitioned: each rank holds about half of the LLM
        assert all(
            abs(n - report["llm_params"] / 2) <= 0.05 * report["llm_params"]
            for n in report["llm_params_per_rank"]
        )
    # The checkpoint's config and export give the trained model back, and it generates.
    ckpt = out / "checkpoints" / "step_00000002"
    cfg = from_dict(ModelConfig, json.loads((ckpt / "config.json").read_text())["model"], "model")
    cfg.weights.proj = str(ckpt / "llama_proj.pth")
    model = from_config(cfg).eval()
    exported = torch.load(ckpt / "llama_proj.pth", weights_only=True)["model"]
    assert torch.equal(model.llama_proj.weight, exported["llama_proj.weight"])
    # The projection was made for the folder's width (48, 96 or 80), not the tiny preset's 64.
    assert model.llama_proj.weight.shape[0] == model.llm.config.hidden_size != 64
    conv = model.new_conversation()
    conv.add_image()
    conv.ask("What is it?")
    [reply] = model.generate(torch.randn(1, 3, 56, 56), conv.prompt_for_reply(), max_new_tokens=4)
    assert isinstance(reply, str)
