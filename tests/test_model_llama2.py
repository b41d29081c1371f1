"""The official LLaMA-2 MiniGPT-4: image tokens without a Q-Former, fresh ln_vision, its text and chat
templates, strict loading of its checkpoint, and its recipes (shared/reference/README.md, "The LLaMA-2
variant")."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from mgpt4.model import WeightsError, apply_freeze, build_model, from_config, load_weights
from mgpt4.model.presets import llama2_7b, stage1_text, stage2_text, tiny, tiny_llama2, vicuna7b
from mgpt4.model.prompts import LLAMA2_CHAT, STAGE2_INSTRUCTIONS, VICUNA_V0_SYSTEM, Conversation
from mgpt4.strict_config import ConfigError
from mgpt4.tokenizer import encode_answers, load_tokenizer, train_tiny_tokenizer
from tests.conftest import TOKENIZER_CORPUS
from tests.official_files import eva_vit_state
from tests.test_model_forward import CAPTIONS, reference_loss


def _tiny_llama2(tokenizer, text=None, seed: int = 0):
    cfg = tiny_llama2()
    if text is not None:
        cfg.text = text
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer)
    apply_freeze(model)
    return model.eval()


def test_parity_sizes_give_4_tokens_of_width_256_from_16_patches(tokenizer):
    """The sizes the external parity check uses, through the documented preset: ViT 56 px / patch 14 /
    width 64 / depth 3 / 4 heads, no Q-Former, projection 256 -> 64, LLaMA 64 / 2 layers / 4 heads / FFN 128."""
    cfg = tiny_llama2()
    assert cfg.qformer is None and cfg.text.template == "llama2_chat"
    v, m = cfg.vision, cfg.llm
    assert (v.image_size, v.patch_size, v.width, v.depth, v.heads) == (56, 14, 64, 3, 4)
    assert (m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size, m.vocab_size) == (
        64,
        2,
        4,
        128,
        400,
    )
    model = _tiny_llama2(tokenizer)
    assert model.qformer is None and model.query_tokens is None and model.num_image_tokens == 4
    assert not any(k.startswith(("qformer.", "query_tokens")) for k in model.state_dict())
    assert tuple(model.llama_proj.weight.shape) == (64, 256)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        vit = model.ln_vision(model.visual_encoder.forward_features(images))
        assert vit.shape == (2, 17, 64)  # CLS + 16 patches
        # Official: drop CLS, then view(bs, 16 / 4, 64 * 4): 4 adjacent patch tokens side by side.
        tokens = vit[:, 1:].reshape(2, 4, 256)
        assert torch.equal(tokens[:, 1, 64:128], vit[:, 6])  # token 1 holds patches 4..7
        ours = model.encode_img(images)
    assert ours.shape == (2, 4, 64)
    torch.testing.assert_close(ours, model.llama_proj(tokens), rtol=0, atol=0)


def test_full_size_layout_is_64_tokens_of_5632_into_llama2_7b():
    model = build_model(llama2_7b(), device="meta")
    assert model.num_image_tokens == 64 and tuple(model.llama_proj.weight.shape) == (4096, 5632)
    assert type(model.llm).__name__ == "LlamaForCausalLM" and model.llm.config.num_hidden_layers == 32


@pytest.fixture(scope="module")
def llama2_files(tmp_path_factory, tokenizer):
    """eva_vit_g.pth, a Llama-2-style LLM folder and `pretrained_minigpt4_llama2_7b.pth`, at parity sizes."""
    root = tmp_path_factory.mktemp("llama2")
    cfg = tiny_llama2()
    torch.save(eva_vit_state(cfg), root / "eva_vit_g.pth")
    torch.manual_seed(3)
    source = build_model(cfg, tokenizer)
    source.llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    gen = torch.Generator().manual_seed(4)
    proj = {
        "llama_proj.weight": torch.randn(64, 256, generator=gen) * 0.05,
        "llama_proj.bias": torch.randn(64, generator=gen) * 0.05,
    }
    torch.save({"model": proj}, root / "pretrained_minigpt4_llama2_7b.pth")
    return {
        "eva_vit": str(root / "eva_vit_g.pth"),
        "llm": str(root / "llm"),
        "proj": str(root / "pretrained_minigpt4_llama2_7b.pth"),
    }


def _with_weights(cfg, **weights):
    return dataclasses.replace(cfg, weights=dataclasses.replace(cfg.weights, **weights))


def test_official_llama2_checkpoint_loads_strictly_and_ln_vision_stays_fresh(llama2_files):
    model = from_config(_with_weights(tiny_llama2(), **llama2_files))
    proj = torch.load(llama2_files["proj"])["model"]
    assert torch.equal(model.llama_proj.weight, proj["llama_proj.weight"])
    assert torch.equal(model.llama_proj.bias, proj["llama_proj.bias"])
    # No file provides ln_vision in this variant: the official code keeps LayerNorm's initial values.
    assert torch.equal(model.ln_vision.weight, torch.ones(64)) and torch.equal(
        model.ln_vision.bias, torch.zeros(64)
    )
    assert model.ln_vision.eps == 1e-5
    vit = torch.load(llama2_files["eva_vit"])
    assert torch.equal(model.visual_encoder.pos_embed, vit["pos_embed"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "llama_proj.weight",
        "llama_proj.bias",
    ]


def test_a_projection_of_the_other_variant_names_both_variants(tmp_path, llama2_files):
    qformer_file = tmp_path / "pretrained_minigpt4.pth"
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(64, 64), "llama_proj.bias": torch.zeros(64)}},
        qformer_file,
    )
    model = build_model(_with_weights(tiny_llama2(), proj=str(qformer_file)))
    with pytest.raises(WeightsError) as err:
        load_weights(model)
    msg = str(err.value)
    for part in ("[64, 64]", "[64, 256]", "LLaMA-2 variant", "input 256", "Q-Former variant", "input 64"):
        assert part in msg, (part, msg)
    # The other way round: the LLaMA-2 projection into a Q-Former model.
    model = build_model(_with_weights(tiny(), proj=llama2_files["proj"]))
    with pytest.raises(WeightsError, match=r"\[64, 256\], made for the LLaMA-2 variant"):
        load_weights(model)


def test_full_size_projection_mismatch_names_5632_and_768(tmp_path):
    path = tmp_path / "pretrained_minigpt4_7b.pth"
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(4096, 768), "llama_proj.bias": torch.zeros(4096)}}, path
    )
    model = build_model(_with_weights(llama2_7b(), proj=str(path)), device="meta")
    with pytest.raises(WeightsError) as err:
        load_weights(model)
    msg = str(err.value)
    assert "[4096, 768]" in msg and "[4096, 5632]" in msg and "input 5632" in msg and "input 768" in msg
    model = build_model(_with_weights(vicuna7b(), proj=str(path)), device="meta")
    path2 = tmp_path / "pretrained_minigpt4_llama2_7b.pth"
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(4096, 5632), "llama_proj.bias": torch.zeros(4096)}}, path2
    )
    model = build_model(_with_weights(vicuna7b(), proj=str(path2)), device="meta")
    with pytest.raises(WeightsError, match=r"made for the LLaMA-2 variant .*input 5632"):
        load_weights(model)


def test_a_blip2_file_is_refused_without_a_qformer(tmp_path):
    path = tmp_path / "blip2_pretrained_flant5xxl.pth"
    torch.save({"model": {}}, path)
    # Refused by the config itself, so that a dry run says it too (before: only when loading).
    with pytest.raises(ConfigError, match=r"model.weights.blip2 is set, but model.qformer is null"):
        build_model(_with_weights(tiny_llama2(), blip2=str(path)))
    # And by the same check when loading a model whose config was changed after it was built.
    model = build_model(tiny_llama2())
    model.cfg.weights.blip2 = str(path)
    with pytest.raises(ConfigError, match=r"model.weights.blip2 is set, but model.qformer is null"):
        load_weights(model)


def test_literal_eos_and_bos_text_become_their_ids(tmp_path, tokenizer):
    """As the official slow LLaMA tokenizer, even from a folder whose tokenizer config says otherwise."""
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    conf["split_special_tokens"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    tok = load_tokenizer(str(folder))
    ids, mask = encode_answers(tok, ["a red circle"], "</s>", 160, pad_to_max_len=False)
    assert ids[0, -1].item() == tok.eos_token_id == 2 and int(mask.sum()) == ids.shape[1]
    assert tok("<s>[INST] hi", add_special_tokens=False)["input_ids"][0] == tok.bos_token_id == 1


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_llama2_loss_matches_the_hand_reference(tokenizer, stage):
    text = stage1_text("llama2_chat") if stage == "stage1" else stage2_text("llama2_chat")
    model = _tiny_llama2(tokenizer, text)
    images = torch.randn(3, 3, 56, 56)
    instruction = STAGE2_INSTRUCTIONS[2] if stage == "stage2" else None
    prompt = f"[INST] {instruction} [/INST] " if instruction else None
    end_sym = "</s>" if stage == "stage2" else "\n"
    with torch.no_grad():
        ours = model.loss(images, CAPTIONS, instruction=instruction)
        ref = reference_loss(model, tokenizer, images, CAPTIONS, prompt, end_sym, text.max_txt_len)
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)
    if stage == "stage2":  # every answer ends with the EOS id, as the official Llama-2 recipe trains
        ids, mask = encode_answers(tokenizer, CAPTIONS, model.text_spec.end_sym, 160)
        assert all(row[m.bool()][-1] == tokenizer.eos_token_id for row, m in zip(ids, mask))


def test_llama2_chat_template_and_its_context(tokenizer):
    conv = Conversation(LLAMA2_CHAT)
    conv.add_image()
    conv.ask("What is in the picture?")
    first = conv.prompt_for_reply()
    assert first == VICUNA_V0_SYSTEM + "<s>[INST] <Img><ImageHere></Img> What is in the picture? [/INST] "
    conv.add_reply("A red circle.")
    conv.ask("Where?")
    assert conv.prompt_for_reply() == first + "A red circle.<s>[INST] Where? [/INST] "
    # The model picks its own template, and BOS is both prepended and written as `<s>` in the text.
    model = _tiny_llama2(tokenizer)
    assert model.new_conversation() == Conversation(LLAMA2_CHAT)
    system, rest = first.split("<ImageHere>")[0].split("<s>")
    with torch.no_grad():
        embeds = model.context_embeds(first, [torch.zeros(1, 4, 64)])
    ids = [1, *tokenizer(system, add_special_tokens=False)["input_ids"], 1]
    ids += tokenizer(rest, add_special_tokens=False)["input_ids"]
    expected = model.llm.get_input_embeddings()(torch.tensor(ids))
    torch.testing.assert_close(embeds[0, : len(ids)], expected)
    assert (embeds[0, len(ids) : len(ids) + 4] == 0).all()


def test_chat_session_follows_the_model_template(tokenizer, tmp_path):
    from mgpt4.chat.session import ChatSession, GenerationSettings
    from tests.chat_fixtures import write_image

    model = _tiny_llama2(tokenizer)
    session = ChatSession(model)
    session.set_image(write_image(str(tmp_path / "img.png")))
    reply = session.reply("What is it?", GenerationSettings(max_new_tokens=4, sample=False))
    prompt = session.conversation.prompt_for_reply()
    assert prompt.startswith(VICUNA_V0_SYSTEM + "<s>[INST] <Img><ImageHere></Img> What is it? [/INST] ")
    assert prompt.endswith(f" [/INST] {reply} [/INST] ")


def test_llama2_recipes_hold_the_official_settings():
    from mgpt4.train.recipes import get_recipe

    for stage in ("stage1", "stage2"):
        ours, vicuna = get_recipe(f"{stage}_llama2_7b"), get_recipe(f"{stage}_vicuna7b")
        # The same schedule, learning rates, batch sizes and source ratios as the Vicuna recipes; each
        # recipe writes to its own folder.
        assert ours.train.output_dir == f"outputs/{stage}_llama2_7b"
        same_train = dataclasses.replace(ours.train, output_dir=vicuna.train.output_dir) == vicuna.train
        assert ours.optim == vicuna.optim and same_train and ours.data == vicuna.data
        assert ours.model.qformer is None and ours.model.weights.blip2 is None
        assert ours.model.llm == vicuna.model.llm and ours.model.text.template == "llama2_chat"
    s1, s2 = get_recipe("stage1_llama2_7b").model.text, get_recipe("stage2_llama2_7b").model.text
    assert (s1.instructions, s1.end_sym, s1.max_txt_len) == ([], "\n", 32)
    assert (s2.prompt_template, s2.end_sym, s2.max_txt_len) == ("[INST] {} [/INST] ", "</s>", 160)
    assert s2.instructions == STAGE2_INSTRUCTIONS


def test_the_tiny_run_trains_the_llama2_variant_with_its_own_demo_files(tmp_path, monkeypatch):
    """`--set model.qformer=null` on the tiny recipe: no BLIP-2 file is asked for or generated."""
    from mgpt4.strict_config import apply_overrides
    from mgpt4.train.assets import fill_demo_paths, tiny_weights_location
    from mgpt4.train.recipes import get_recipe

    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    cfg = apply_overrides(
        get_recipe("tiny_stage1"), ["model.qformer=null", "model.text.template=llama2_chat"]
    )
    filled = fill_demo_paths(cfg)
    assert cfg.model.weights.blip2 is None and cfg.model.weights.eva_vit in filled
    assert tiny_weights_location(cfg.model).blip2 is None
    assert "noq" in os.path.dirname(cfg.model.weights.eva_vit)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def _official_slow_tokenizer(model_file: str):
    """The tokenizer the official code loads: `LlamaTokenizer.from_pretrained(llama_model, use_fast=False)`
    (Vision-CAIR/MiniGPT-4 minigpt4/models/mini_gpt4.py and minigpt_base.py), the sentencepiece model
    itself with legacy behaviour: text is cut at special tokens and each piece is encoded on its own.
    transformers 5 keeps that tokenizer as `SentencePieceBackend`."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(
        vocab_file=model_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=True
    )


@pytest.mark.parametrize("template", ["vicuna_v0", "llama2_chat"])
def test_prompt_ids_equal_the_official_slow_tokenizer_in_a_multi_turn_chat(tmp_path, tokenizer, template):
    """Issue 20.12. The official chat (minigpt4/conversation/conversation.py, `Chat.get_context_emb`)
    splits the prompt at `<ImageHere>` and tokenizes each segment with the slow tokenizer,
    `add_special_tokens` only for the first (BOS before it). In Llama-2-Chat every turn writes `<s>`,
    after which the slow tokenizer starts the next piece with `▁` (`▁[`). A Llama-2 folder's tokenizer
    as transformers 5 loads it (`LlamaTokenizer`, no `legacy` flag or `legacy: false`) does not."""
    folder = tmp_path / "llama2_tokenizer"
    train_tiny_tokenizer(TOKENIZER_CORPUS, str(folder))  # writes tokenizer.model, as a Llama-2 folder has
    model_file = folder / "tokenizer.model"
    conf = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**conf, "legacy": False}))
    ours_tok = load_tokenizer(str(folder))
    slow = _official_slow_tokenizer(str(model_file))

    text = dataclasses.replace(tiny_llama2().text, template=template)
    model = _tiny_llama2(ours_tok, text)
    conv = model.new_conversation()
    conv.add_image()
    conv.ask("What is in the picture?")
    conv.add_reply("A red circle on a blue background.")
    conv.ask("Where is the star?")
    conv.add_reply("In the bottom right corner.")
    conv.ask("And the squares?")
    prompt = conv.prompt_for_reply()
    assert prompt.count("<s>") == (3 if template == "llama2_chat" else 0)

    # The official slow tokenizer's `add_special_tokens=True` is BOS before the segment (`add_bos_token`).
    official = [
        [slow.bos_token_id] * (i == 0) + slow(seg, add_special_tokens=False)["input_ids"]
        for i, seg in enumerate(prompt.split("<ImageHere>"))
    ]
    runs = model.layout(prompt).text_runs()
    assert runs == official
    if template == "llama2_chat":  # each `<s>` is BOS, and the piece after it starts with `▁[`
        ids = runs[1]
        after_bos = [ids[k + 1] for k, t in enumerate(ids[:-1]) if t == 1]
        assert len(after_bos) == 2
        assert all(slow.convert_ids_to_tokens(t) == "▁" for t in after_bos)
        # What the folder's own tokenizer gives for the joined text: one `▁` fewer per turn.
        plain = ours_tok(prompt.split("<ImageHere>")[1], add_special_tokens=False)["input_ids"]
        assert len(plain) == len(ids) - 2


def test_a_recipe_switched_to_another_template_is_refused_not_trained_in_the_old_one(tokenizer):
    """Issue 20.14: `tiny_stage2 --set model.text.template=chat_template` kept Vicuna's
    `###Human: {} ###Assistant: ` and `###` without a word. The recipe's values are refused, naming
    them; nulled, the template's own are taken."""
    from mgpt4.model.templates import resolve_text
    from mgpt4.strict_config import apply_overrides
    from mgpt4.train.recipes import get_recipe
    from tests.decoder_folders import MISTRAL_CHAT_TEMPLATE

    saved, tokenizer.chat_template = tokenizer.chat_template, MISTRAL_CHAT_TEMPLATE
    try:
        cfg = apply_overrides(get_recipe("tiny_stage2"), ["model.text.template=chat_template"])
        with pytest.raises(
            ConfigError,
            match=r"model.text.prompt_template='###Human: \{\} ###Assistant: ' "
            r"is the vicuna_v0 template's and model.text.end_sym='###' is the vicuna_v0",
        ):
            resolve_text(cfg.model.text, tokenizer)
        model = build_model(cfg.model, tokenizer)
        with pytest.raises(ConfigError, match=r"model\.text\.prompt_template=null"):
            model.text_spec  # noqa: B018  (the model resolves its text on first use)
        cfg = apply_overrides(cfg, ["model.text.prompt_template=null", "model.text.end_sym=null"])
        spec = resolve_text(cfg.model.text, tokenizer)
        assert spec.instruction == "<s>[INST] {} [/INST]" and spec.end_sym == "</s>"
    finally:
        tokenizer.chat_template = saved
    # A Vicuna recipe switched to Llama-2-Chat: the same refusal; its own template's values stay accepted.
    cfg = apply_overrides(get_recipe("stage2_vicuna7b"), ["model.text.template=llama2_chat"])
    with pytest.raises(ConfigError, match="is the vicuna_v0 template's"):
        resolve_text(cfg.model.text, tokenizer)
    assert resolve_text(get_recipe("stage2_llama2_7b").model.text, tokenizer).end_sym == "</s>"
    assert resolve_text(get_recipe("stage2_vicuna7b").model.text, tokenizer).end_sym == "###"


def test_the_loaded_projection_is_logged_once_with_its_path_on_rank_0(llama2_files, caplog, monkeypatch):
    """Issue 20.14: stage 2 starts from a projection and never said which. One informational line names
    the file (rank 0 only: `mgpt4.logs.RankFilter` passes informational lines of the shown ranks)."""
    import logging

    import mgpt4.logs
    from mgpt4.logs import RankFilter

    with caplog.at_level(logging.INFO, logger="mgpt4"):
        from_config(_with_weights(tiny_llama2(), **llama2_files))
    lines = [r for r in caplog.records if llama2_files["proj"] in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, caplog.text
    assert lines[0].getMessage() == f"projection llama_proj [64, 256] loaded from {llama2_files['proj']}"
    monkeypatch.delenv("MGPT4_LOG_RANKS", raising=False)
    for rank, shown in ((0, True), (1, False)):
        monkeypatch.setattr(mgpt4.logs, "process_rank", lambda rank=rank: (rank, 2))
        assert RankFilter().filter(lines[0]) is shown
