"""Any decoder-only Hugging Face LLM: tiny random LLaMA, Mistral and Qwen2 folders, their sizes read from
config.json, their tokenizers' chat templates and BOS conventions, FLOPs from the folder's config,
generation, and the projection exported and loaded back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from mgpt4.config import LLMConfig
from mgpt4.model import WeightsError, build_model, from_config
from mgpt4.model.export import save_projection
from mgpt4.model.generation import stop_sequences
from mgpt4.model.llm import llm_sizes
from mgpt4.model.presets import decoder, stage2_text, tiny
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS, clean_reply
from mgpt4.strict_config import ConfigError
from mgpt4.tokenizer import encode_answers
from mgpt4.train.flops import llm_forward_flops, train_flops_per_sample
from tests.conftest import TOKENIZER_CORPUS
from tests.decoder_folders import ARCHITECTURES, write_decoder_folder
from tests.official_files import write_tiny_vision_files

CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = str(tmp_path_factory.mktemp("decoders"))
    return {arch: write_decoder_folder(root, arch, tokenizer, TOKENIZER_CORPUS) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory):
    return write_tiny_vision_files(str(tmp_path_factory.mktemp("vision")))


def decoder_cfg(folder: str, vision_files: dict, template: str = "chat_template"):
    """The `decoder` preset at the tiny vision sizes: the LLM and its sizes come from the folder."""
    base = tiny()
    cfg = decoder()
    cfg.vision, cfg.qformer, cfg.precision = base.vision, base.qformer, base.precision
    cfg.text = stage2_text(template)
    cfg.weights = dataclasses.replace(cfg.weights, llm=folder, **vision_files)
    return cfg


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sizes_come_from_the_folder_config(arch, folders, vision_files):
    folder = folders[arch]
    template = "vicuna_v0" if arch == "llama" else "chat_template"
    model = from_config(decoder_cfg(folder, vision_files, template))
    hf = AutoConfig.from_pretrained(folder)
    assert type(model.llm).__name__ == CLASSES[arch] and model.cfg.llm == LLMConfig()
    assert tuple(model.llama_proj.weight.shape) == (hf.hidden_size, 64)  # 48, 96, 80: not the preset's 64
    assert model.llm.config.num_key_value_heads == hf.num_key_value_heads
    # FLOPs and MFU count the folder's LLM (its width, grouped-query attention, vocabulary).
    sizes = llm_sizes(hf)
    assert (sizes.hidden_size, sizes.num_kv_heads, sizes.vocab_size) == (
        hf.hidden_size,
        hf.num_key_value_heads,
        hf.vocab_size,
    )
    flops = train_flops_per_sample(model.cfg, 40)
    assert flops == train_flops_per_sample(model.cfg, 40, sizes)
    kv = sizes.num_kv_heads * sizes.head_dim
    h, f, L, V = sizes.hidden_size, sizes.intermediate_size, sizes.num_layers, sizes.vocab_size
    by_hand = L * (40 * 2 * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * 40 * 40 * h) + 2 * 40 * h * V
    assert llm_forward_flops(sizes, 40) == by_hand


def test_preset_sizes_are_still_checked_against_the_folder(folders, vision_files):
    cfg = decoder_cfg(folders["mistral"], vision_files)
    cfg.llm = dataclasses.replace(tiny().llm, model_type="llama")
    with pytest.raises(WeightsError) as err:  # by the build, before any part is built
        build_model(cfg)
    assert "model.llm.model_type: config says llama, config.json has mistral" in str(err.value)
    assert "model.llm.hidden_size: config says 64, config.json has 96" in str(err.value)


def test_a_random_llm_without_sizes_says_what_is_missing():
    cfg = decoder()
    with pytest.raises(ConfigError, match=r"model.llm.vocab_size: a random LLM .* needs"):
        build_model(cfg, device="meta")


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_chat_template_of_the_tokenizer_is_the_conversation(arch, folders, vision_files):
    model = from_config(decoder_cfg(folders[arch], vision_files))
    tok = model.tokenizer
    conv = model.new_conversation()
    conv.add_image()
    conv.ask("What is it?")
    prompt = conv.prompt_for_reply()
    chat = [{"role": "user", "content": "<Img><ImageHere></Img> What is it?"}]
    assert prompt == tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    # Stage 2 wraps instructions into one user turn of the same template, answers end with EOS.
    wrapped = model.wrap_instruction(STAGE2_INSTRUCTIONS[0])
    chat = [{"role": "user", "content": STAGE2_INSTRUCTIONS[0]}]
    assert wrapped == tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert model.text_spec.end_sym == tok.eos_token
    with torch.no_grad():
        embeds = model.context_embeds(prompt, [torch.zeros(1, 8, model.llm.config.hidden_size)])
    first = tok(prompt.split("<ImageHere>")[0], add_special_tokens=False)["input_ids"]
    if arch == "qwen2":  # no BOS token at all
        assert tok.bos_token_id is None and model.text_spec.bos_id is None
        ids = first
    else:  # the template writes `<s>` itself: it is not doubled
        assert first[0] == tok.bos_token_id and first[1] != tok.bos_token_id
        ids = first
    expected = model.llm.get_input_embeddings()(torch.tensor(ids))
    torch.testing.assert_close(embeds[0, : len(ids)], expected)


def test_qwen2_loss_has_no_bos_and_ends_answers_with_its_eos(folders, vision_files):
    """The training sequence by hand: [before] [image] [after] [answer + <|im_end|>], no BOS anywhere."""
    model = from_config(decoder_cfg(folders["qwen2"], vision_files)).eval()
    tok = model.tokenizer
    images = torch.randn(2, 3, 56, 56)
    captions = ["a red circle", "two green squares at the top"]
    instruction = STAGE2_INSTRUCTIONS[1]
    with torch.no_grad():
        ours = model.loss(images, captions, instruction=instruction)
        img = model.encode_img(images)
        before, after = model.wrap_instruction(instruction).split("<ImageHere>")
        embed = model.llm.get_input_embeddings()
        b_ids = tok(before, add_special_tokens=False)["input_ids"]
        a_ids = tok(after, add_special_tokens=False)["input_ids"]
        total, count = 0.0, 0
        for i, caption in enumerate(captions):
            answer = tok(caption + "<|im_end|>", add_special_tokens=False)["input_ids"][:160]
            assert answer[-1] == tok.eos_token_id
            seq = torch.cat(
                [embed(torch.tensor(b_ids)), img[i], embed(torch.tensor(a_ids)), embed(torch.tensor(answer))]
            )
            labels = torch.tensor([-100] * (len(b_ids) + img.shape[1] + len(a_ids)) + answer)
            logits = model.llm(inputs_embeds=seq[None]).logits[0]
            keep = labels[1:] != -100
            total = total + F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum")
            count += int(keep.sum())
    assert torch.allclose(ours, total / count, atol=1e-5)


def test_add_bos_true_needs_a_bos_token(folders, vision_files):
    cfg = decoder_cfg(folders["qwen2"], vision_files)
    cfg.text.add_bos = True
    model = from_config(cfg)
    with pytest.raises(ConfigError, match=r"model.text.add_bos: true, but the tokenizer has no BOS"):
        model.loss(torch.randn(1, 3, 56, 56), ["a red circle"])


def test_stop_text_comes_from_the_config(folders, vision_files):
    cfg = decoder_cfg(folders["llama"], vision_files, "vicuna_v0")
    assert from_config(cfg).text_spec.stops == ("###",)
    cfg.text.stop = ["circle"]
    model = from_config(cfg)
    assert model.text_spec.stops == ("circle",) and model.new_conversation().template.stops == ("circle",)
    seqs = stop_sequences(model.tokenizer, model.text_spec.stops)
    assert seqs and all("circle" in model.tokenizer.decode(s) for s in seqs)
    template = model.new_conversation().template
    assert clean_reply("a red circle on blue", template.stops, template.echo) == "a red"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_then_export_and_load_the_projection_back(arch, folders, vision_files, tmp_path):
    template = "llama2_chat" if arch == "llama" else "chat_template"
    cfg = decoder_cfg(folders[arch], vision_files, template)
    torch.manual_seed(0)
    model = from_config(cfg).eval()
    conv = model.new_conversation()
    conv.add_image()
    conv.ask("Describe it.")
    replies = model.generate(torch.randn(2, 3, 56, 56), conv.prompt_for_reply(), max_new_tokens=6)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with torch.no_grad():
        model.llama_proj.weight.normal_()
    path = str(tmp_path / "llama_proj.pth")
    save_projection({f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()}, path)
    loaded = from_config(dataclasses.replace(cfg, weights=dataclasses.replace(cfg.weights, proj=path)))
    assert torch.equal(loaded.llama_proj.weight, model.llama_proj.weight)
    assert torch.equal(loaded.llama_proj.bias, model.llama_proj.bias)
    # The encoded tokens agree too.
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_img(images), model.encode_img(images))
    assert encode_answers(loaded.tokenizer, ["x"], loaded.text_spec.end_sym, 4)[0].shape == (1, 4)
