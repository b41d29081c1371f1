"""`python -m mgpt4.export hf` (issue 23, part 1): the folder loads in a fresh process that cannot import
mgpt4, through AutoProcessor and the model class, and gives mgpt4's greedy tokens and logits.

Three tiny fp32 models, one per conversation template, each exported from a run folder through the
command: Vicuna v0 (Q-Former, `Blip2ForConditionalGeneration`), Llama-2-Chat (the LLaMA-2 variant, remote
code) and a tokenizer's chat template (Q-Former with a Qwen2 decoder: ChatML, no BOS, tied embeddings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgpt4.checkpoints import CONFIG_FILE, PROJ_FILE, RUN_STATE, write_done
from mgpt4.export.__main__ import main as export_main
from mgpt4.images import eval_transform
from mgpt4.inference import ModelSource, load_model
from mgpt4.model import MiniGPT4, apply_freeze, build_model
from mgpt4.model.export import save_official_files, save_projection
from mgpt4.model.generation import GREEDY
from mgpt4.model.presets import decoder, tiny, tiny_llama2
from mgpt4.strict_config import to_dict
from tests.chat_fixtures import WORD_PIECE, write_image
from tests.conftest import TOKENIZER_CORPUS
from tests.decoder_folders import write_decoder_folder

HERE = os.path.dirname(os.path.abspath(__file__))
LOADER = os.path.join(HERE, "export_hf_loader.py")
NEW_TOKENS = 12
# Float noise between two implementations of the same fp32 network (measured: ~3e-6 at tiny size).
FLOAT_TOL = 2e-5
QUESTIONS = {
    "vicuna_v0": [("Describe this image in detail.", None)],
    "llama2_chat": [("What is in the picture?", "A red square."), ("Where is it?", None)],
    "chat_template": [("Could you describe the contents of this image for me?", None)],
}


def _readable(model: MiniGPT4) -> MiniGPT4:
    """An output head that picks word pieces only: greedy replies of letters that never stop early.
    (Not for tied embeddings, where the head is the input table.)"""
    tok = model.tokenizer
    vocab = tok.convert_ids_to_tokens(list(range(model.llm.config.vocab_size)))
    keep = torch.tensor([bool(WORD_PIECE.fullmatch(p or "")) for p in vocab])
    with torch.no_grad():
        model.llm.lm_head.weight[~keep] = 0
    return model


def _model(template: str, tokenizer, root: str) -> MiniGPT4:
    torch.manual_seed(0)
    if template == "vicuna_v0":
        model = _readable(build_model(tiny(), tokenizer))
    elif template == "llama2_chat":
        model = _readable(build_model(tiny_llama2(), tokenizer))
    else:
        base, cfg = tiny(), decoder()
        cfg.vision, cfg.qformer, cfg.precision = base.vision, base.qformer, base.precision
        cfg.weights = dataclasses.replace(
            cfg.weights, llm=write_decoder_folder(root, "qwen2", tokenizer, TOKENIZER_CORPUS)
        )
        model = build_model(cfg)
        with torch.device("cpu"):
            model.llm = type(model.llm)(model.llm.config)  # random weights instead of the meta skeleton
        model.cfg.weights.llm = None
    # Trained-looking vision and projection weights (not the init's ones and zeros).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("llm."):
                p.add_(torch.randn_like(p) * 0.02)
    apply_freeze(model)
    return model.eval()


def _write_run(model: MiniGPT4, root: str) -> str:
    """The model as a finished run leaves it: official files, a checkpoint naming them, metrics.jsonl."""
    weights = save_official_files(model, os.path.join(root, "official"))
    run = os.path.join(root, "run")
    ckpt = os.path.join(run, "checkpoints", "step_00000010")
    os.makedirs(ckpt)
    save_projection(
        {f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()},
        os.path.join(ckpt, PROJ_FILE),
    )
    cfg = dataclasses.replace(model.cfg, weights=weights)
    config = {
        "model": to_dict(cfg),
        "data": {
            "kind": "webdataset",
            "sources": [{"name": "laion", "shards": "/data/laion/{00000..00009}.tar", "ratio": 1.0}],
        },
        "train": {"steps": 10},
    }
    with open(os.path.join(ckpt, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f)
    torch.save({"step": 10, "samples_seen": 80}, os.path.join(ckpt, RUN_STATE))
    write_done(ckpt, rank=0, world_size=1, step=10)
    with open(os.path.join(run, "checkpoints", "latest"), "w", encoding="utf-8") as f:
        f.write("step_00000010\n")
    with open(os.path.join(run, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"step": 5, "train/loss": 3.5, "val/loss": 3.25}) + "\n")
        f.write(json.dumps({"step": 10, "train/loss": 2.75}) + "\n")
    return run


def _messages(turns) -> list[dict]:
    out: list[dict] = []
    for i, (question, reply) in enumerate(turns):
        content: list[dict] = [{"type": "text", "text": question}]
        if i == 0:
            content.insert(0, {"type": "image"})
        out.append({"role": "user", "content": content})
        if reply is not None:
            out.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return out


def _reference(model: MiniGPT4, image_path: str, turns) -> dict:
    """mgpt4's pixels, prompt logits (own ln_vision eps, and 1e-6 as transformers' BLIP-2 has it) and
    greedy tokens for the conversation `turns` about the image."""
    from PIL import Image

    conv = model.new_conversation()
    conv.add_image()
    for question, reply in turns:
        conv.ask(question)
        if reply is not None:
            conv.add_reply(reply)
    prompt = conv.prompt_for_reply()
    pixels = eval_transform(Image.open(image_path), model.cfg.vision.image_size).unsqueeze(0)
    out = {"pixel_values": pixels}
    with torch.no_grad():
        for key, eps in (("logits", model.ln_vision.eps), ("logits_eps_1e-6", 1e-6)):
            saved, model.ln_vision.eps = model.ln_vision.eps, eps
            try:
                embeds = model.context_embeds(prompt, [model.encode_img(pixels)])
                out[key] = model.llm(inputs_embeds=embeds).logits[0].float()
            finally:
                model.ln_vision.eps = saved
    out["reply"], out["tokens"] = greedy_reply(model, pixels, prompt)
    return out


def greedy_reply(model: MiniGPT4, pixels: torch.Tensor, prompt: str) -> tuple[str, list[int]]:
    """mgpt4's greedy reply to `prompt` about one image [1,3,S,S] (NEW_TOKENS at most), and the new token
    ids its LLM's generate returned."""
    captured = {}
    generate = model.llm.generate

    def recording(*args, **kwargs):
        captured["ids"] = generate(*args, **kwargs)
        return captured["ids"]

    model.llm.generate = recording
    try:
        reply = model.generate(pixels, prompt, GREEDY, max_new_tokens=NEW_TOKENS)[0]
    finally:
        del model.llm.generate
    return reply, captured["ids"][0].tolist()


def run_loader(jobs: list[dict], root: Path) -> None:
    """Run the loader on `jobs` in a fresh process that cannot import mgpt4; each job's result file is
    then written (`tests/export_hf_loader.py`)."""
    spec = str(root / "jobs.json")
    with open(spec, "w", encoding="utf-8") as f:
        json.dump(jobs, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"
    )
    # -I: no PYTHONPATH, no current folder; the loader also blocks any import of mgpt4 (it is installed).
    proc = subprocess.run(
        [sys.executable, "-I", LOADER, spec],
        env=env,
        cwd=str(root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """template -> (export folder, run folder, mgpt4's reference, the loader's results)."""
    root = tmp_path_factory.mktemp("export")
    image = write_image(str(root / "image.png"), size=(90, 70))
    jobs, results = [], {}
    for template, turns in QUESTIONS.items():
        case = root / template
        run = _write_run(_model(template, tokenizer, str(case)), str(case))
        out = str(case / "hf")
        assert export_main(["hf", "--checkpoint", run, "--out", out, "--device", "cpu"]) == 0
        # The model as every tool loads it: what the export must reproduce.
        model = load_model(ModelSource(checkpoint=run, device="cpu"))
        ref = _reference(model, image, turns)
        job = {
            "folder": out,
            "image": image,
            "messages": _messages(turns),
            "remote": model.qformer is None,
            "new_tokens": NEW_TOKENS,
            "result": str(case / "result.pt"),
            "resaved": str(case / "resaved"),
        }
        jobs.append(job)
        results[template] = (out, run, ref, job)
    run_loader(jobs, root)
    return {
        t: (out, run, ref, torch.load(job["result"], weights_only=True))
        for t, (out, run, ref, job) in results.items()
    }


@pytest.mark.parametrize("template", list(QUESTIONS))
def test_the_export_loads_without_mgpt4_and_gives_mgpt4s_greedy_tokens(exports, template):
    _, _, ref, got = exports[template]
    assert got["mgpt4_importable"] is False
    assert got["processor_class"] == "Blip2Processor"
    assert got["model_class"] == (
        "MiniGPT4Llama2ForConditionalGeneration"
        if template == "llama2_chat"
        else "Blip2ForConditionalGeneration"
    )
    assert torch.equal(got["pixel_values"], ref["pixel_values"])  # PIL bicubic + CLIP normalisation, exactly
    assert got["tokens"] == ref["tokens"]
    assert len(ref["tokens"]) == NEW_TOKENS or template == "chat_template"  # readable heads never stop early
    assert got["reply"] == ref["reply"]


@pytest.mark.parametrize("template", list(QUESTIONS))
def test_logits_agree_within_the_ln_vision_eps_effect(exports, template):
    _, _, ref, got = exports[template]
    vocab = ref["logits"].shape[-1]
    logits = got["logits"][:, :vocab]
    assert logits.shape == ref["logits"].shape
    eps_effect = float((ref["logits_eps_1e-6"] - ref["logits"]).abs().max())
    diff = float((logits - ref["logits"]).abs().max())
    if template == "llama2_chat":
        # Its own modeling code gives post_layernorm ln_vision's eps: the same network.
        assert diff <= FLOAT_TOL
    else:
        # transformers' BLIP-2 runs ln_vision at 1e-6: mgpt4 at that eps is what it computes.
        assert float((logits - ref["logits_eps_1e-6"]).abs().max()) <= FLOAT_TOL
        assert diff <= eps_effect + FLOAT_TOL
    # The <image> token's logit exists only in the export, and generation suppresses it.
    assert got["image_token_suppressed"] is True


@pytest.mark.parametrize("template", list(QUESTIONS))
def test_save_load_save_is_identical(exports, template):
    _, _, _, got = exports[template]
    assert got["resaved_files"], "the loader saved nothing"
    assert got["resaved_differences"] == []


def test_the_folder_holds_the_processor_generation_config_and_model_card(exports):
    out, run, _, _ = exports["vicuna_v0"]
    with open(os.path.join(out, "generation_config.json"), encoding="utf-8") as f:
        gen = json.load(f)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    image_id = config["image_token_index"]
    # The official demo's defaults, Vicuna v0's stop string and the <image> logit suppressed.
    assert (gen["do_sample"], gen["top_p"], gen["temperature"], gen["max_new_tokens"]) == (
        True,
        0.9,
        1.0,
        300,
    )
    assert gen["stop_strings"] == ["###"] and gen["suppress_tokens"] == [image_id]
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]
    assert config["vision_config"]["num_hidden_layers"] == tiny().vision.depth
    with open(os.path.join(out, "processor_config.json"), encoding="utf-8") as f:
        processor = json.load(f)
    assert processor.get("num_query_tokens") is None  # the chat template places the image tokens
    card = Path(out, "README.md").read_text(encoding="utf-8")
    assert "- steps: 10 of 10 planned" in card and "- samples seen: 80" in card
    assert "- last training loss: 2.7500 (step 10)" in card and "- validation loss: 3.2500 (step 5)" in card
    assert "/data/laion/{00000..00009}.tar` (10 shards" in card
    assert "license:  #" in card and "- licence: \n" in card
    assert (
        "- ln_vision runs at eps 1e-06 instead of 1e-05" in card
        and "image embeddings change by at most" in card
    )
    with open(os.path.join(run, "..", "hf", "chat_template.jinja"), encoding="utf-8") as f:
        assert "<Img>" in f.read()


def test_the_model_card_reports_caption_scores(tmp_path, exports):
    _, run, _, _ = exports["vicuna_v0"]
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"CIDEr": 0.5, "Bleu_4": 0.25, "images": 7, "step": 10}))
    out = str(tmp_path / "hf")
    assert (
        export_main(
            ["hf", "--checkpoint", run, "--out", out, "--device", "cpu", "--eval-metrics", str(metrics)]
        )
        == 0
    )
    card = Path(out, "README.md").read_text(encoding="utf-8")
    assert f"- {metrics}: Bleu_4 0.2500, CIDEr 0.5000 (7 images, step 10)" in card


def _one_line_exit(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        export_main(argv)
    message = str(e.value.code)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line(tmp_path, exports):
    _, run, _, _ = exports["vicuna_v0"]
    # A run folder without a complete checkpoint: the save was cut short (no done marker of its rank).
    broken = tmp_path / "broken"
    ckpt = broken / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / RUN_STATE).write_bytes(b"")
    (ckpt / CONFIG_FILE).write_text("{}")
    (ckpt / PROJ_FILE).write_bytes(b"")
    (broken / "checkpoints" / "latest").write_text("step_00000010\n")
    out = str(tmp_path / "out")
    assert "no mgpt4 checkpoint found there" in _one_line_exit(
        ["hf", "--checkpoint", str(broken), "--out", out, "--device", "cpu"]
    )
    assert not os.path.exists(out)
    # An output folder that exists and is not empty: nothing is loaded or written.
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    message = _one_line_exit(["hf", "--checkpoint", run, "--out", str(full), "--device", "cpu"])
    assert str(full) in message and "not empty" in message
    assert os.listdir(full) == ["keep.txt"]
    # An 8-bit LLM would be written as something else than it is: refused, not quantised and exported.
    message = _one_line_exit(["hf", "--checkpoint", run, "--out", out, "--llm-8bit"])
    assert message.startswith("--llm-8bit:")
    # A metrics.json that is not one.
    bad = tmp_path / "metrics.json"
    bad.write_text("{}")
    message = _one_line_exit(
        ["hf", "--checkpoint", run, "--out", out, "--device", "cpu", "--eval-metrics", str(bad)]
    )
    assert str(bad) in message and "no caption scores" in message
    assert not os.path.exists(out)


def test_the_readme_loads_an_export_as_written_without_mgpt4(exports, tmp_path):
    """The README's "Share your model" snippet, as written, on the Vicuna v0 export (in a process that
    cannot import mgpt4): it runs and prints the reply sampled with the export's own generation config."""
    import shutil

    from tests.test_readme_api import readme_api_block

    out, _, _, _ = exports["vicuna_v0"]
    shutil.copytree(out, tmp_path / "exports" / "tiny_stage1")
    write_image(str(tmp_path / "photo.jpg"))
    code = Path(LOADER).read_text(encoding="utf-8").split("# End of the mgpt4 blocker")[0]
    code += "\n" + readme_api_block("share")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The reply is sampled (the official defaults), so only its printing is certain.
    assert proc.stdout.endswith("\n") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("template", ["vicuna_v0", "llama2_chat"])
def test_a_llama_tokenizer_folder_tokenizes_prompts_as_the_official_slow_tokenizer(
    tmp_path, template, legacy
):
    """A Vicuna / Llama-2 folder as transformers 5 reads it (LlamaTokenizer, `legacy` false or true): the
    exported tokenizer is legacy, so the processor's prompt ids are mgpt4's (the export checks them on
    its probe conversations and stops otherwise), also for a question that holds `<s>` and `</s>`."""
    from mgpt4.export.processor import IMAGE_TOKEN, build_processor, mgpt4_prompt_ids
    from mgpt4.tokenizer import load_tokenizer, train_tiny_tokenizer

    folder = tmp_path / "tok"
    train_tiny_tokenizer(TOKENIZER_CORPUS, str(folder))
    conf = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**conf, "legacy": legacy}))
    tok = load_tokenizer(str(folder))
    assert type(tok).__name__ == "LlamaTokenizer"
    torch.manual_seed(0)
    model = build_model(tiny() if template == "vicuna_v0" else tiny_llama2(), tok).eval()
    processor, image_id = build_processor(model)
    assert processor.tokenizer.convert_ids_to_tokens(image_id) == IMAGE_TOKEN
    turns = [("a red<s>[INST] circle", "two squares</s> here"), ("why?", None)]
    conv = model.new_conversation()
    conv.add_image()
    for question, reply in turns:
        conv.ask(question)
        if reply is not None:
            conv.add_reply(reply)
    text = processor.tokenizer.apply_chat_template(
        _messages(turns), add_generation_prompt=True, tokenize=False
    )
    assert processor.tokenizer(text)["input_ids"] == mgpt4_prompt_ids(
        model, conv.prompt_for_reply(), image_id
    )


def test_a_chat_template_that_writes_bos_on_a_llama_tokenizer(tmp_path):
    """A Mistral-Instruct-style model (LlamaTokenizer, `legacy` false: `▁` only at the start of a text; a
    chat template that writes BOS itself): mgpt4 tokenizes the text after an image on its own, so it
    starts with `▁`; the export's template puts a space there so the whole prompt tokenizes the same,
    with one BOS."""
    from mgpt4.export.processor import build_processor, mgpt4_prompt_ids
    from mgpt4.tokenizer import load_tokenizer, train_tiny_tokenizer
    from tests.decoder_folders import MISTRAL_CHAT_TEMPLATE

    folder = tmp_path / "tok"
    train_tiny_tokenizer(TOKENIZER_CORPUS, str(folder))
    conf = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**conf, "legacy": False}))
    tok = load_tokenizer(str(folder))
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    cfg = tiny()
    cfg.text = dataclasses.replace(cfg.text, template="chat_template")
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    processor, image_id = build_processor(model)
    turns = [("What is it?", "A circle."), ("Where?", None)]
    conv = model.new_conversation()
    conv.add_image()
    for question, reply in turns:
        conv.ask(question)
        if reply is not None:
            conv.add_reply(reply)
    want = mgpt4_prompt_ids(model, conv.prompt_for_reply(), image_id)
    text = processor.tokenizer.apply_chat_template(
        _messages(turns), add_generation_prompt=True, tokenize=False
    )
    assert f"<Img>{'<image>' * model.num_image_tokens} </Img>" in text
    assert processor.tokenizer(text)["input_ids"] == want
    assert want.count(tok.bos_token_id) == 1
