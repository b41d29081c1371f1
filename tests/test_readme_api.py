"""The README's Python API example runs as written, on tiny files with the official names."""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from PIL import Image

from mgpt4.model.export import save_official_files, save_projection
from mgpt4.model.minigpt4 import MiniGPT4
from tests.launch import REPO


def readme_api_block(name: str = "api") -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        block = re.search(rf"<!-- {name} -->\s*```python\n(.*?)```", f.read(), re.S)
    assert block, f"README.md has no {name} block"
    return block.group(1)


def test_readme_api_example_runs(tmp_path, tiny_cfg, tokenizer, monkeypatch):
    torch.manual_seed(0)
    source = MiniGPT4(tiny_cfg, tokenizer=tokenizer)
    w = save_official_files(source, str(tmp_path / "official"))
    weights = tmp_path / "weights"
    weights.mkdir()
    os.rename(w.eva_vit, weights / "eva_vit_g.pth")
    os.rename(w.blip2, weights / "blip2_pretrained_flant5xxl.pth")
    os.rename(w.llm, weights / "vicuna-13b")
    proj = {k: v for k, v in source.state_dict().items() if k.startswith("llama_proj.")}
    save_projection(proj, str(weights / "pretrained_minigpt4.pth"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg"
    )
    monkeypatch.chdir(tmp_path)
    # The same code, on the tiny preset instead of the 13B one.
    code = (
        readme_api_block()
        .replace("vicuna13b()", "tiny()")
        .replace("import stage2_text, vicuna13b", "import stage2_text, tiny")
    )
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["img_embeds"].shape == (1, 8, 64)
    assert torch.isfinite(scope["loss"]) and scope["loss"].requires_grad
    assert isinstance(scope["reply"], str)
    assert torch.equal(scope["model"].llama_proj.weight, proj["llama_proj.weight"])


def test_readme_llama2_api_example_runs(tmp_path, tokenizer, monkeypatch):
    """The LLaMA-2 variant's example, on its parity sizes (`tiny_llama2()`): no BLIP-2 file, fresh
    ln_vision, the official checkpoint's layout, and the Llama-2-Chat conversation."""
    from mgpt4.model.presets import tiny_llama2
    from mgpt4.model.prompts import VICUNA_V0_SYSTEM

    torch.manual_seed(0)
    source = MiniGPT4(tiny_llama2(), tokenizer=tokenizer)
    w = save_official_files(source, str(tmp_path / "official"))
    assert w.blip2 is None
    weights = tmp_path / "weights"
    weights.mkdir()
    os.rename(w.eva_vit, weights / "eva_vit_g.pth")
    os.rename(w.llm, weights / "Llama-2-7b-chat-hf")
    proj = {k: v for k, v in source.state_dict().items() if k.startswith("llama_proj.")}
    save_projection(proj, str(weights / "pretrained_minigpt4_llama2_7b.pth"))
    monkeypatch.chdir(tmp_path)
    code = (
        readme_api_block("api-llama2")
        .replace("llama2_7b()", "tiny_llama2()")
        .replace("import llama2_7b, stage2_text", "import stage2_text, tiny_llama2")
    )
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert model.qformer is None and model.num_image_tokens == 4
    assert torch.equal(model.llama_proj.weight, proj["llama_proj.weight"])
    assert scope["prompt"] == (
        VICUNA_V0_SYSTEM + "<s>[INST] <Img><ImageHere></Img> What is in the picture? [/INST] "
    )
