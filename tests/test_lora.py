"""LoRA on the frozen LLM (`model.lora`), one process: the trainable set, the optimizer's groups, the PEFT
folder (loaded by peft alone), the merge, strict loading, and the refusals of a mismatched setting."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
import torch

from mgpt4.checkpoints import CONFIG_FILE, PROJ_FILE, ResumeError
from mgpt4.config import OptimConfig
from mgpt4.inference import ModelSource, load_model
from mgpt4.model import WeightsError, apply_freeze, build_model, load_weights
from mgpt4.model.export import save_official_files, save_projection
from mgpt4.model.lora import LORA_DIR, attach_lora, load_lora, merge_lora, save_peft_adapter
from mgpt4.model.presets import tiny
from mgpt4.strict_config import ConfigError, apply_overrides, to_dict
from mgpt4.train.optim import build_optimizer
from mgpt4.train.recipes import get_recipe
from mgpt4.train.resume import check_lora
from tests.chat_fixtures import readable_tiny_model, write_image

peft = pytest.importorskip("peft")

PROJ = {"llama_proj.weight", "llama_proj.bias"}


def lora_cfg(rank: int = 4, targets=("q_proj", "v_proj")):
    cfg = tiny()
    cfg.lora.rank = rank
    cfg.lora.alpha = 8.0
    cfg.lora.target_modules = list(targets)
    return cfg


def lora_model(tokenizer, cfg=None, seed: int = 0):
    """The tiny model with adapters whose B is random (fresh ones are zero: no effect to test)."""
    torch.manual_seed(seed)
    model = build_model(cfg or lora_cfg(), tokenizer)
    load_weights(model)  # no files: attaches fresh adapters
    apply_freeze(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.5)
    return model


def lora_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_" in n}


def plain_copy(model):
    """The model without its adapters: a fresh tiny build with the model's other weights."""
    plain = build_model(tiny(), model.tokenizer)
    own = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(own, strict=True)
    return plain


def llm_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return llm(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250]])


def test_freeze_policy_declares_the_adapters_next_to_the_projection(tokenizer):
    model = lora_model(tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # 2 layers x (q_proj, v_proj) x (A, B)
    assert len(lora_names(model)) == 8 and trainable == PROJ | lora_names(model)
    assert all(n.startswith("llm.model.layers.") and ".default." in n for n in lora_names(model))
    # Adapters train in the projection's dtype; the LLM's own weights stay frozen.
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if ".lora_" not in n)


def test_gradient_reaches_only_the_projection_and_the_adapters(tokenizer):
    model = lora_model(tokenizer)
    model.train()
    loss = model.loss(torch.randn(2, 3, 56, 56), ["a red circle", "a blue square"])
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == PROJ | lora_names(model)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in grads)


def test_optimizer_covers_exactly_the_trainable_set_with_the_adapters_lr(tokenizer):
    model = lora_model(tokenizer)
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=2, lora_lr=5e-3)
    optimizer, scheduler = build_optimizer(model, o, total_steps=10)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            lrs[names[id(p)]] = g["initial_lr"]
    assert {lrs[n] for n in PROJ} == {1e-3} and {lrs[n] for n in lora_names(model)} == {5e-3}
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    proj_lr, lora_lr = (
        {g["lr"] for g in optimizer.param_groups if g["initial_lr"] == 1e-3},
        {g["lr"] for g in optimizer.param_groups if g["initial_lr"] == 5e-3},
    )
    # The same warmup + cosine shape, scaled to each peak.
    assert len(proj_lr) == len(lora_lr) == 1 and lora_lr.pop() == pytest.approx(5 * proj_lr.pop())


def test_peft_folder_loads_with_peft_alone_and_the_merge_gives_the_same_logits(tokenizer, tmp_path):
    model = lora_model(tokenizer).eval()  # no LoRA dropout
    base = plain_copy(model).llm  # the same LLM weights, no adapters
    folder = save_peft_adapter(dict(model.named_parameters()), model.cfg, str(tmp_path / "adapter"))
    expected = llm_logits(model.llm, IDS)
    assert not torch.allclose(expected, llm_logits(base, IDS), atol=1e-3)  # the adapters change the LLM

    loaded = peft.PeftModel.from_pretrained(base, folder)  # peft alone
    assert torch.allclose(llm_logits(loaded, IDS), expected, atol=1e-5, rtol=0)
    merged = loaded.merge_and_unload()
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(llm_logits(merged, IDS), expected, atol=1e-5, rtol=0)

    # mgpt4's own merge (what an export calls): the plain LLM, same logits.
    ours = merge_lora(model.llm)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in ours.named_parameters())
    assert torch.allclose(llm_logits(ours, IDS), expected, atol=1e-5, rtol=0)


def test_weights_lora_loads_the_folder_strictly(tokenizer, tmp_path):
    model = lora_model(tokenizer).eval()
    folder = save_peft_adapter(dict(model.named_parameters()), model.cfg, str(tmp_path / "adapter"))
    cfg = lora_cfg()
    cfg.weights.lora = folder
    # Same seed: the same frozen weights; fresh adapters (B = 0), then the folder's, by load_weights.
    torch.manual_seed(0)
    other = build_model(cfg, tokenizer)
    load_weights(other)
    other.eval()
    assert torch.equal(llm_logits(other.llm, IDS), llm_logits(model.llm, IDS))
    with torch.no_grad():
        for n, p in other.named_parameters():
            if ".lora_" in n:
                p.zero_()
    assert not torch.equal(llm_logits(other.llm, IDS), llm_logits(model.llm, IDS))
    load_lora(other, folder)
    assert torch.equal(llm_logits(other.llm, IDS), llm_logits(model.llm, IDS))

    wrong = build_model(lora_cfg(rank=2), tokenizer)
    wrong.cfg.weights.lora = folder
    with pytest.raises(WeightsError, match=r"adapter_config\.json: r is 4, but model\.lora\.rank is 2"):
        load_weights(wrong)
    wider = build_model(lora_cfg(targets=("q_proj", "v_proj", "o_proj")), tokenizer)
    wider.cfg.weights.lora = folder
    with pytest.raises(WeightsError, match=r"target_modules .* model\.lora\.target_modules"):
        load_weights(wider)


def test_config_refuses_lora_settings_that_would_be_ignored(tmp_path):
    cfg = apply_overrides(
        get_recipe("tiny_stage2"), [f"data.align_root={tmp_path}", f"data.val.align_root={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"^optim\.lora_lr is set .* model\.lora\.rank is 0"):
        apply_overrides(cfg, ["optim.lora_lr=0.001"]).validate()
    with pytest.raises(ConfigError, match=r"^model\.lora\.alpha is set, but model\.lora\.rank is 0"):
        apply_overrides(cfg, ["model.lora.alpha=32"]).validate()
    with pytest.raises(ConfigError, match=r"^model\.lora\.dropout: expected 0 <= dropout < 1"):
        apply_overrides(cfg, ["model.lora.rank=4", "model.lora.dropout=1.5"]).validate()
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank: expected 0 \(off\)"):
        apply_overrides(cfg, ["model.lora.rank=-1"]).validate()
    with pytest.raises(ConfigError, match=r"^model\.weights\.lora names .*\(LoRA off\)"):
        apply_overrides(cfg, ["model.weights.lora=/x"]).validate()
    apply_overrides(cfg, ["model.lora.rank=4", "optim.lora_lr=0.001"]).validate()


def test_a_target_that_names_no_layer_is_refused(tokenizer):
    model = build_model(lora_cfg(targets=("q_proj", "qkv")), tokenizer)
    with pytest.raises(
        ConfigError, match=r"^model\.lora\.target_modules: \['qkv'\] name no layer .*'q_proj'"
    ):
        load_weights(model)


def _checkpoint_config(tmp_path, lora_rank: int, alpha: float = 16.0) -> str:
    folder = tmp_path / f"ckpt_r{lora_rank}_a{alpha}"
    folder.mkdir()
    cfg = get_recipe("tiny_stage2")
    cfg.model.lora.rank, cfg.model.lora.alpha = lora_rank, alpha
    (folder / CONFIG_FILE).write_text(json.dumps(to_dict(cfg)))
    return str(folder)


def test_resume_refuses_a_changed_lora_naming_the_field(tmp_path):
    plain, with_lora = (
        get_recipe("tiny_stage2"),
        apply_overrides(get_recipe("tiny_stage2"), ["model.lora.rank=4"]),
    )
    lora_ckpt, plain_ckpt = _checkpoint_config(tmp_path, 4), _checkpoint_config(tmp_path, 0)
    # A recipe that does not declare LoRA refuses a LoRA run, and the other way round.
    with pytest.raises(
        ResumeError, match=r"model\.lora\.rank is 4 at the checkpoint and 0 in this run \(LoRA off\)"
    ):
        check_lora(lora_ckpt, plain)
    with pytest.raises(ResumeError, match=r"model\.lora\.rank is 0 at the checkpoint and 4 in this run"):
        check_lora(plain_ckpt, with_lora)
    with pytest.raises(ResumeError, match=r"model\.lora\.alpha is 16\.0 at the checkpoint and 32\.0"):
        check_lora(lora_ckpt, apply_overrides(with_lora, ["model.lora.alpha=32"]))
    check_lora(lora_ckpt, with_lora)
    check_lora(plain_ckpt, plain)
    # A config written before model.lora existed had LoRA off.
    old = tmp_path / "old"
    old.mkdir()
    saved = to_dict(plain)
    del saved["model"]["lora"]
    (old / CONFIG_FILE).write_text(json.dumps(saved))
    check_lora(str(old), plain)
    with pytest.raises(ResumeError, match=r"model\.lora\.rank is 0 at the checkpoint"):
        check_lora(str(old), with_lora)


def write_lora_checkpoint(model, root: str) -> str:
    """The model as a LoRA run leaves it: the official files of its parts, the projection, the PEFT folder,
    and the config naming them, in a checkpoint folder of a run folder."""
    weights = save_official_files(plain_copy(model), os.path.join(root, "official"))
    ckpt = os.path.join(root, "run", "checkpoints", "step_00000010")
    os.makedirs(ckpt)
    save_projection(
        {f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()},
        os.path.join(ckpt, PROJ_FILE),
    )
    save_peft_adapter(dict(model.named_parameters()), model.cfg, os.path.join(ckpt, LORA_DIR))
    saved = to_dict(model.cfg)
    saved["weights"] = to_dict(weights)
    with open(os.path.join(ckpt, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"model": saved}, f)
    with open(os.path.join(root, "run", "checkpoints", "latest"), "w", encoding="utf-8") as f:
        f.write("step_00000010\n")
    return os.path.join(root, "run")


@pytest.fixture(scope="module")
def readable_lora(tokenizer):
    """A readable tiny model (word pieces only) with random adapters."""
    model = readable_tiny_model(tokenizer)
    model.cfg.lora = lora_cfg().lora
    attach_lora(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.5)
    apply_freeze(model)
    return model.eval()


def test_the_loader_and_chat_load_a_lora_run_and_reply(readable_lora, tmp_path, capsys, monkeypatch):
    from mgpt4.chat import terminal as chat
    from mgpt4.model.generation import GREEDY
    from tests.test_chat import generated

    run = write_lora_checkpoint(readable_lora, str(tmp_path))
    loaded = load_model(ModelSource(checkpoint=run, device="cpu"))
    assert lora_names(loaded) == lora_names(readable_lora)
    assert torch.equal(llm_logits(loaded.llm, IDS), llm_logits(readable_lora.llm, IDS))

    image = write_image(str(tmp_path / "flag.png"))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the picture?\n"))
    chat.main(["--image", image, "--checkpoint", run, "--device", "cpu", "--greedy", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    expected = generated(
        readable_lora, image, "What is in the picture?", settings=GREEDY.replace(max_new_tokens=6)
    )
    assert re.search(r"MiniGPT-4: \S+", out) and f"MiniGPT-4: {expected}\n" in out

    # Without the adapters (model.lora off) the run's projection is refused, naming the folder.
    plain = tiny()
    plain.weights.proj = os.path.join(run, "checkpoints", "step_00000010", PROJ_FILE)
    with pytest.raises(WeightsError, match=r"trained with LoRA adapters .*lora_adapter.* model\.lora is off"):
        load_weights(build_model(plain, readable_lora.tokenizer))


def test_starting_the_data_or_measuring_the_cpu_leaves_the_dropout_rng(tmp_path):
    """LoRA's dropout draws from the global RNG, which a resume restores before the loop starts the data
    and the metrics measure the CPU: neither may draw from it, or a resumed run's dropout masks differ."""
    from mgpt4.data import DataConfig, build_loader
    from mgpt4.train.flops import measure_matmul_tflops
    from tests.data_fixtures import make_align, tiny_tokenizer

    root = make_align(tmp_path / "a", 6)
    cfg = DataConfig(kind="align", align_root=root, batch_size=3, num_workers=0, image_size=16)
    loader = build_loader(cfg, tiny_tokenizer(), 24, "###")
    before = torch.get_rng_state()
    next(iter(loader))
    measure_matmul_tflops(sizes=(8,), seconds=0.01)
    assert torch.equal(torch.get_rng_state(), before)


def test_an_export_of_a_lora_run_merges_the_adapters_and_loads_back(readable_lora, tmp_path):
    """python -m mgpt4.export hf on a LoRA run: the folder is a plain transformers LLM whose logits are the
    adapted model's (the merge), its card says so, and it loads back through --checkpoint."""
    from safetensors import safe_open

    from mgpt4.export.__main__ import main as export_main

    run = write_lora_checkpoint(readable_lora, str(tmp_path))
    folder = str(tmp_path / "hf")
    assert export_main(["hf", "--checkpoint", run, "--out", folder, "--device", "cpu"]) == 0
    names = set()
    for file in os.listdir(folder):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(folder, file), "pt") as f:
                names |= set(f.keys())
    assert names and not any("lora_" in n or "base_layer" in n for n in names)
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
        assert "LoRA adapters (rank 4, alpha 8, on q_proj, v_proj) are merged" in f.read()

    back = load_model(ModelSource(checkpoint=folder, device="cpu"))
    assert not lora_names(back) and not back.cfg.lora.enabled()
    want = llm_logits(readable_lora.llm, IDS)
    # The adapters moved the logits; the merged weights give them again (up to fp32 rounding of W + BA).
    assert (want - llm_logits(plain_copy(readable_lora).llm, IDS)).abs().max() > 1e-2
    torch.testing.assert_close(llm_logits(back.llm, IDS), want, rtol=1e-5, atol=1e-5)
