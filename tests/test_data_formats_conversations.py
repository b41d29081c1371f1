"""Stage 2 on multi-turn conversations: rendered in the model's template, loss on the answers only, cut by
whole turns, packed equal to unpacked, loaded and resumed exactly, sources mixed by ratio."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.data.formats.records import parse_record
from mgpt4.data.packing import RowPacker
from mgpt4.data.workers import DataSourceError
from mgpt4.model import apply_freeze, build_model
from mgpt4.model.presets import stage2_text, tiny
from mgpt4.model.prompts import STAGE2_INSTRUCTIONS
from mgpt4.strict_config import ConfigError
from mgpt4.tokenizer import encode_answers
from tests.data_fixtures import tiny_tokenizer
from tests.decoder_folders import CHATML_TEMPLATE
from tests.format_fixtures import llava_entries, llava_set, sharegpt_set, write_images, write_json
from tests.test_data_resume import _take

TURNS = [
    ("user", "<image>\nWhat is in the picture?"),
    ("assistant", "a red circle"),
    ("user", "and at the top?"),
    ("assistant", "a small purple star"),
]


def _model(tokenizer, template="vicuna_v0"):
    cfg = tiny()
    cfg.text = stage2_text(template)
    cfg.text.max_txt_len = 24
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    apply_freeze(model)
    return model.train()


def _batch(encoded, length):
    ids = torch.full((len(encoded), length), 0, dtype=torch.int64)
    mask, labels = torch.zeros_like(ids), torch.zeros_like(ids)
    for n, e in enumerate(encoded):
        ids[n, : len(e.ids)] = torch.tensor(e.ids)
        mask[n, : len(e.ids)] = 1
        labels[n, : len(e.loss)] = torch.tensor(e.loss)
    return {
        "text_ids": ids,
        "text_mask": mask,
        "text_labels": labels,
        "image_at": torch.tensor([e.image_at for e in encoded]),
    }


@pytest.mark.parametrize("template", ["vicuna_v0", "llama2_chat"])
def test_a_single_turn_conversation_is_the_official_stage2_sample(tokenizer, template):
    model = _model(tokenizer, template)
    instruction = STAGE2_INSTRUCTIONS[0]  # "<Img><ImageHere></Img> Describe this image in detail."
    question = instruction.split("</Img> ", 1)[1]
    enc = model.conversation_encoder(64).encode([("user", question), ("assistant", "a red circle")])
    lay = model.sample_layouts(0)[0]
    before, after = lay.text_runs()
    ids, mask = encode_answers(tokenizer, ["a red circle"], model.text_spec.end_sym, 24)
    answer = ids[0, : int(mask[0].sum())].tolist()
    assert list(enc.ids) == before + after + answer
    assert enc.image_at == len(before) and list(enc.loss) == [0] * (len(before) + len(after)) + [1] * len(
        answer
    )
    # The same loss as the official stage-2 batch (instruction 0), to the last bit.
    torch.manual_seed(1)
    images = torch.randn(2, 3, 56, 56)
    official = model(image=images, text_ids=ids.expand(2, -1), text_mask=mask.expand(2, -1),
                     instruction=torch.zeros(2, dtype=torch.int64)).loss  # fmt: skip
    conv = model(image=images, **_batch([enc, enc], 40)).loss
    assert torch.allclose(conv, official, atol=1e-6, rtol=0), (conv, official)


@pytest.mark.parametrize(
    "template,text",
    [
        (
            "vicuna_v0",
            "###Human: <Img><ImageHere></Img>\nWhat is in the picture? ###Assistant: a red circle###"
            "Human: and at the top? ###Assistant: a small purple star###",
        ),
        (
            "llama2_chat",
            "[INST] <Img><ImageHere></Img>\nWhat is in the picture? [/INST] a red circle</s>"
            "<s>[INST] and at the top? [/INST] a small purple star</s>",
        ),
    ],
)
def test_multi_turn_loss_on_the_answers_only(tokenizer, template, text):
    model = _model(tokenizer, template)
    enc = model.conversation_encoder(200).encode(TURNS)
    ids = list(enc.ids)
    image_ids = len(tokenizer("<Img>", add_special_tokens=False)["input_ids"])
    assert enc.image_at > image_ids and enc.exchanges == 2
    # The image goes between <Img> and </Img>; the answers and their end symbol are what the loss reads.
    assert tokenizer.decode(ids[: enc.image_at], skip_special_tokens=True).replace(" ", "").endswith("<Img>")
    read = [t for t, m in zip(ids, enc.loss) if m]
    end = model.text_spec.end_sym
    expected = [
        *tokenizer("a red circle" + end, add_special_tokens=False)["input_ids"],
        *tokenizer("a small purple star" + end, add_special_tokens=False)["input_ids"],
    ]
    assert read == expected
    decoded = tokenizer.decode(ids[1:], skip_special_tokens=False).replace(" ", "").replace("\n", "")
    assert decoded == text.replace("<ImageHere>", "").replace(" ", "").replace("\n", "")


def test_a_system_message_goes_first(tokenizer):
    model = _model(tokenizer)
    enc = model.conversation_encoder(200).encode(TURNS[:2], system="a small purple star")
    decoded = tokenizer.decode(list(enc.ids), skip_special_tokens=True).replace(" ", "")
    assert decoded.startswith("asmallpurplestar###Human:")


def test_the_tokenizers_chat_template_renders_every_turn(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML_TEMPLATE
    model = _model(tok, "chat_template")
    encoder = model.conversation_encoder(400)
    assert encoder.first.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    assert encoder.later.startswith("<|im_end|>\n<|im_start|>user\n") or encoder.later.startswith(
        "\n<|im_start|>user\n"
    )
    assert encoder.first_system.startswith("<|im_start|>system\n\x00MGPT4-SYSTEM\x00<|im_end|>")
    enc = encoder.encode(TURNS)
    read = [t for t, m in zip(enc.ids, enc.loss) if m]
    assert tok.decode(read).count(tok.eos_token) == 2


def test_long_conversations_are_cut_by_whole_turns(tokenizer):
    model = _model(tokenizer)
    full = model.conversation_encoder(400).encode(TURNS)
    first = model.conversation_encoder(400).encode(TURNS[:2])
    cut = model.conversation_encoder(len(full.ids) - 1).encode(TURNS)
    assert cut.exchanges == 1 and cut.ids == first.ids and cut.loss == first.loss
    assert model.conversation_encoder(len(first.ids) - 1).encode(TURNS) is None
    # The image in the second exchange: the cut may not drop it.
    late = [
        ("user", "hello"),
        ("assistant", "a red circle"),
        ("user", "<image> and this?"),
        ("assistant", "a star"),
    ]
    whole = model.conversation_encoder(400).encode(late)
    assert whole.exchanges == 2 and whole.image_at > len(first.ids) - 10
    assert model.conversation_encoder(len(whole.ids) - 1).encode(late) is None


def test_packed_conversations_equal_unpacked(tokenizer):
    model = _model(tokenizer)
    encoder = model.conversation_encoder(80)
    encoded = [
        encoder.encode(TURNS),
        encoder.encode(TURNS[:2]),
        encoder.encode([("user", "describe"), ("assistant", "two green squares and a yellow triangle")]),
    ]
    torch.manual_seed(2)
    images = torch.randn(3, 3, 56, 56)
    batch = _batch(encoded, 80)
    unpacked = model(image=images, **batch).loss
    n_img = model.num_image_tokens
    packer = RowPacker(2, 160, 3)
    for e in encoded:
        assert packer.place(len(e.ids) + n_img)
    slot, pos = packer.layout()
    packed = model(image=images, **batch, pack_slot=slot, pack_pos=pos).loss
    assert torch.allclose(packed, unpacked, atol=1e-5, rtol=0), (packed, unpacked)


def _conv_cfg(sources, **kw) -> DataConfig:
    base = {"kind": "conversations", "batch_size": 3, "num_workers": 0, "image_size": 16, "shuffle_buffer": 7,
            "conversation_tokens": 96}  # fmt: skip
    return DataConfig(sources=sources, **{**base, **kw})


@pytest.fixture(scope="module")
def data_model():
    return _model(tiny_tokenizer())


def _loader(cfg, model):
    return build_loader(
        cfg, model.tokenizer, 24, "###", conversation=model.conversation_encoder(cfg.conversation_tokens)
    )


@pytest.mark.parametrize("packed,workers", [(False, 2), (True, 0)])
def test_conversation_sources_mix_and_resume_exactly(tmp_path, data_model, packed, workers):
    llava = llava_set(str(tmp_path / "l"), 7, jsonl=True, turns=3)
    share = sharegpt_set(str(tmp_path / "g"), 5, system="Be brief.")
    pack = {"pack_length": 200, "pack_rows": 2, "batch_size": 4} if packed else {}
    cfg = _conv_cfg(
        [SourceConfig(name="l", format="llava", annotations=llava, ratio=2),
         SourceConfig(name="g", format="sharegpt", annotations=share, ratio=1)],
        mix="sample", num_workers=workers, **pack,
    )  # fmt: skip
    full_loader = _loader(cfg, data_model)
    full = _take(full_loader, 7)
    full_loader.close()
    first = _loader(cfg, data_model)
    head = _take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = _loader(cfg, data_model)
    resumed.load_state_dict(state)
    tail = _take(resumed, 4)
    resumed.close()
    for i, (a, b) in enumerate(zip(head + tail, full)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)
    b0 = full[0]
    assert b0["text_ids"].shape == (cfg.batch_size, 96) and b0["image_at"].shape == (cfg.batch_size,)
    assert {0, 1} <= set(torch.cat([b["source"] for b in full]).tolist())
    if packed:
        assert all("pack_slot" in b for b in full)
    # Every loss position is an answer token: the first one decodes to an answer of the fixtures.
    tok = data_model.tokenizer
    row = b0["text_ids"][0][b0["text_labels"][0].bool()]
    assert "sample" in tok.decode(row.tolist()) or "circle" in tok.decode(row.tolist())


def test_conversations_that_cannot_fit_are_skipped_and_counted(tmp_path, data_model):
    images = write_images(str(tmp_path), 4)
    entries = llava_entries(images, turns=2)
    entries[1]["conversations"][1]["value"] = "a red circle " * 40  # its first exchange cannot fit
    path = write_json(str(tmp_path / "a.json"), entries)
    encoder = data_model.conversation_encoder(1000)
    records = [parse_record(e, "llava")[0] for e in entries]
    firsts = [len(encoder.encode(r.turns[:2]).ids) for r in records]
    wholes = [len(encoder.encode(r.turns).ids) for r in records]
    budget = max(firsts[i] for i in (0, 2, 3))
    assert budget < min(wholes[i] for i in (0, 2, 3)) and firsts[1] > budget
    cfg = _conv_cfg([SourceConfig(format="llava", annotations=path)], conversation_tokens=budget)
    loader = _loader(cfg, data_model)
    batches = _take(loader, 4)
    assert loader.stats()["too_long"] >= 1
    # The budget keeps the first exchange only: one answer (one ###) per conversation, never the second.
    for b in batches:
        for ids, lab in zip(b["text_ids"], b["text_labels"]):
            assert data_model.tokenizer.decode(ids[lab.bool()].tolist()).count("###") == 1
    loader.close()
    cfg.conversation_tokens = 12
    loader = _loader(cfg, data_model)
    with pytest.raises(DataSourceError, match=r"all skipped \(too_long 1000\)"):
        _take(loader, 1)  # no conversation fits: the source stops, naming the reason
    loader.close()


def test_conversation_settings_are_checked(tmp_path, data_model):
    with pytest.raises(
        ConfigError, match="kind 'conversations' reads the formats llava, sharegpt and huggingface"
    ):
        _conv_cfg([SourceConfig(shards="x.tar")]).validate()
    with pytest.raises(ConfigError, match=r"data\.val\.samples: held-out validation reads captions"):
        cfg = _conv_cfg([SourceConfig(format="llava", annotations="a.json")])
        cfg.val.samples = 2
        cfg.validate()
    llava = llava_set(str(tmp_path), 3)
    cfg = _conv_cfg([SourceConfig(format="llava", annotations=llava)])
    with pytest.raises(ValueError, match="needs the model's conversation encoder"):
        build_loader(cfg, data_model.tokenizer, 24, "###")
    cfg.pack_length, cfg.pack_rows = 50, 1
    with pytest.raises(ValueError, match="cannot hold the longest conversation"):
        _loader(cfg, data_model)
