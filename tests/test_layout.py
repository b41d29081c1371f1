"""One sample layout (`mgpt4.model.layout`) for every template and stage, and every user of it agreeing
with the model's actual input: the model's input length, the loader's packed lengths, the tally's
counts, chat's and curation's prompt lengths."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from mgpt4.chat.session import ChatSession
from mgpt4.curate.describe import DescribeConfig, describe_prompts
from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.data.batches import model_inputs
from mgpt4.data.transforms import normalize_uint8
from mgpt4.model import apply_freeze, build_model, from_config
from mgpt4.model.layout import ANSWER, BOS, IMAGE, IMAGE_ONLY, TEXT, layout
from mgpt4.model.presets import decoder, stage1_text, stage2_text, tiny
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS
from mgpt4.tokenizer import encode_answers
from mgpt4.train.tally import Tally, batch_counts
from tests.conftest import TOKENIZER_CORPUS
from tests.data_fixtures import sample_files, write_tar
from tests.decoder_folders import write_decoder_folder
from tests.official_files import write_tiny_vision_files

# The official templates on the LLaMA tokenizer, and a tokenizer's own chat template on two decoders:
# Mistral's writes its own `<s>`, Qwen2's tokenizer has no BOS at all.
TEMPLATES = ["vicuna_v0", "llama2_chat", "chat_template-mistral", "chat_template-qwen2"]
STAGES = ["stage1", "stage2"]
CAPTIONS = [
    "a red circle on a blue background",
    "two green squares",
    "a small purple star in the bottom right corner of the picture",
]


@pytest.fixture(scope="module")
def decoder_files(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("layout")
    vision = write_tiny_vision_files(str(root))
    folders = {
        arch: write_decoder_folder(str(root), arch, tokenizer, TOKENIZER_CORPUS)
        for arch in ("mistral", "qwen2")
    }
    return folders, vision


@pytest.fixture(scope="module")
def models(tokenizer, decoder_files):
    made = {}

    def get(template: str, stage: str):
        if (template, stage) not in made:
            name, _, arch = template.partition("-")
            text = stage1_text(name) if stage == "stage1" else stage2_text(name)
            text.max_txt_len = 24
            torch.manual_seed(0)
            if arch:
                folders, vision = decoder_files
                base, cfg = tiny(), decoder()
                cfg.vision, cfg.qformer, cfg.precision = base.vision, base.qformer, base.precision
                cfg.text = text
                cfg.weights = dataclasses.replace(cfg.weights, llm=folders[arch], **vision)
                model = from_config(cfg)
            else:
                cfg = tiny()
                cfg.text = text
                model = build_model(cfg, tokenizer)
                apply_freeze(model)
            made[template, stage] = model.eval()
        return made[template, stage]

    return get


def _answers(model, pad: bool = True):
    t = model.cfg.text
    return encode_answers(model.tokenizer, CAPTIONS, model.text_spec.end_sym, t.max_txt_len, pad)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_the_layout_is_the_models_input(models, template, stage):
    model = models(template, stage)
    tok, spec = model.tokenizer, model.text_spec
    layouts = model.sample_layouts()
    prompts = model.sample_prompts()
    assert len(layouts) == len(prompts) == max(1, len(model.cfg.text.instructions))
    if stage == "stage1":
        assert prompts == [IMAGE_ONLY]
    else:
        assert prompts == [spec.instruction.format(i) for i in STAGE2_INSTRUCTIONS]
    ids, mask = _answers(model)
    images = torch.randn(len(CAPTIONS), 3, 56, 56)
    for k, (lay, prompt) in enumerate(zip(layouts, prompts)):
        # The segments: [BOS] [text before] [image] [text after] [answer + end_sym].
        kinds = [s.kind for s in lay.segments]
        expected = [TEXT, IMAGE, TEXT] if stage == "stage2" else [IMAGE]
        assert kinds in ([BOS, *expected, ANSWER], [*expected, ANSWER])
        before, after = prompt.split("<ImageHere>")
        text = [tok(t, add_special_tokens=False)["input_ids"] for t in (before, after)]
        assert [list(s.ids) for s in lay.segments if s.kind == TEXT] == [t for t in text if t]
        first = lay.text_runs()[0]
        if spec.bos_id is None:  # Qwen2: no BOS anywhere
            assert template.endswith("qwen2") and BOS not in kinds and spec.bos_id not in first
        else:  # one BOS at the start: added, or written by the template itself (Mistral), never doubled
            assert first[0] == spec.bos_id and first.count(spec.bos_id) == 1
            assert (BOS in kinds) == (text[0][:1] != [spec.bos_id])
        assert lay.count(IMAGE) == model.num_image_tokens
        assert lay.count(ANSWER) == model.cfg.text.max_txt_len == ids.shape[1]
        # The model's actual input, as the training step builds it from the batch's instruction index.
        instruction = {"instruction": torch.full((len(CAPTIONS),), k)} if stage == "stage2" else {}
        with torch.no_grad():
            out = model(image=images, text_ids=ids, text_mask=mask, **instruction)
            inputs, attn, labels = model.build_inputs(model.encode_img(images), ids, mask, prompt)
        assert out.logits.shape[:2] == (len(CAPTIONS), lay.length) and inputs.shape[1] == lay.length
        assert attn.sum(1).tolist() == (lay.context_length + mask.sum(1)).tolist()
        assert (labels[:, : lay.context_length] == -100).all() and (
            labels[:, lay.context_length :] >= 0
        ).any()
        embed = model.llm.get_input_embeddings()
        torch.testing.assert_close(inputs[0, : len(first)], embed(torch.tensor(first, dtype=torch.long)))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_the_tally_counts_the_models_positions(models, template, stage):
    model = models(template, stage)
    ids, mask = _answers(model)
    tally = Tally(model.cfg, model.sample_layouts(), cached=False, device=torch.device("cpu"))
    prompts = model.sample_prompts()
    img = torch.zeros(len(CAPTIONS), model.num_image_tokens, model.llm.config.hidden_size)
    for k, prompt in enumerate(prompts):
        batch = {"text_ids": ids, "text_mask": mask}
        if stage == "stage2":
            batch["instruction"] = torch.full((len(CAPTIONS),), k)
        counts = dict(zip(("samples", "tokens", "positions"), batch_counts(batch, tally.context).tolist()))
        inputs, attn, _ = model.build_inputs(img, ids, mask, prompt)
        positions = inputs.shape[0] * inputs.shape[1]  # every position the LLM computes, padding too
        assert counts == {"samples": len(CAPTIONS), "tokens": int(attn.sum()), "positions": positions}


def _shards(folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    words = " ".join(CAPTIONS).split()
    samples = [
        (f"{i:05d}", sample_files(f"{i:05d}", " ".join(words[: 1 + i % 11]), seed=i)) for i in range(24)
    ]
    return [write_tar(os.path.join(folder, "00000.tar"), samples)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_packed_rows_hold_each_sample_as_the_model_lays_it_out(models, template, stage, tmp_path):
    model = models(template, stage)
    t = model.cfg.text
    layouts = model.sample_layouts()
    longest = max(lay.length for lay in layouts)
    cfg = DataConfig(
        sources=[SourceConfig(shards=_shards(str(tmp_path)))],
        batch_size=6,
        num_workers=0,
        image_size=model.cfg.vision.image_size,
        shuffle_buffer=4,
        pack_length=longest + 8,
        pack_rows=2,
    )
    loader = build_loader(
        cfg,
        model.tokenizer,
        t.max_txt_len,
        model.text_spec.end_sym,
        num_instructions=len(t.instructions),
        context_lengths=[lay.context_length for lay in layouts],
    )
    with pytest.raises(ValueError, match=f"cannot hold the longest sample, .* = {longest}"):
        build_loader(
            dataclasses.replace(cfg, pack_length=longest - 1),
            model.tokenizer,
            t.max_txt_len,
            model.text_spec.end_sym,
            num_instructions=len(t.instructions),
            context_lengths=[lay.context_length for lay in layouts],
        )
    tally = Tally(model.cfg, layouts, cached=False, device=torch.device("cpu"))
    it = iter(loader)
    for _ in range(3):
        batch = next(it)
        batch["image"] = normalize_uint8(batch["image"], torch.float32)
        slot, pos = batch["pack_slot"], batch["pack_pos"]
        used = int((batch["sample_id"] >= 0).sum())
        prompt = model.instruction_prompt(batch.get("instruction"))
        with torch.no_grad():
            img = model.encode_img(batch["image"])
            _, attn, _ = model.build_inputs(img, batch["text_ids"], batch["text_mask"], prompt)
            packed = model(**model_inputs(batch))
            plain = model(**{k: v for k, v in model_inputs(batch).items() if not k.startswith("pack_")})
        for n in range(used):  # each sample's positions in the rows: exactly its input, in order
            assert sorted(pos[slot == n].tolist()) == list(range(int(attn[n].sum())))
        assert not (slot >= used).any()
        torch.testing.assert_close(packed.loss, plain.loss, rtol=1e-5, atol=1e-5)
        tally.add(batch)
        assert batch_counts(batch, tally.context)[:2].tolist() == [used, int(attn[:used].sum())]
    loader.close()


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_and_curation_prompts_are_measured_as_the_model_embeds_them(models, template):
    model = models(template, "stage1")
    session = ChatSession(model)
    session.img_embeds = model.encode_img(torch.randn(1, 3, 56, 56))
    session.reset()
    conv = session.conversation
    conv.ask("What is in the picture?")
    conv.add_reply("A red circle.")
    conv.ask("Where is it?")
    describe = describe_prompts(model, DescribeConfig(images=["x"], out="y"))
    for prompt in (conv.prompt_for_reply(), describe[0], describe[1]("A red circle.")):
        with torch.no_grad():
            embeds = model.context_embeds(prompt, [session.img_embeds])
        assert session.prompt_tokens(prompt) == model.layout(prompt).length == embeds.shape[1]
        assert model.layout(prompt).count(IMAGE) == model.num_image_tokens


def test_a_prompt_of_several_images_and_no_bos():
    """The layout function alone: BOS only when given and not already written, one segment per image."""
    ids = {"a": [5, 6], "<s> b": [1, 7], " c": [8]}
    lay = layout("a<ImageHere><ImageHere> c", ids.__getitem__, 1, 3, answer_tokens=4)
    assert [(s.kind, s.length) for s in lay.segments] == [
        (BOS, 1),
        (TEXT, 2),
        (IMAGE, 3),
        (IMAGE, 3),
        (TEXT, 1),
        (ANSWER, 4),
    ]
    assert (lay.length, lay.context_length, lay.num_images) == (14, 10, 2)
    assert lay.text_runs() == [[1, 5, 6], [], [8]]
    written = layout("<s> b<ImageHere>", ids.__getitem__, 1, 3)
    assert [s.kind for s in written.segments] == [TEXT, IMAGE] and written.text_runs() == [[1, 7], []]
    none = layout(IMAGE_ONLY, ids.__getitem__, None, 3)
    assert [(s.kind, s.length) for s in none.segments] == [(IMAGE, 3)]
