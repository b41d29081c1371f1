"""Chat: image checks and preprocessing, streamed multi-turn replies, low-memory flags, and the
terminal chat driven in a pseudo-terminal the way a person types into it."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
import threading
import unicodedata

import pytest
import torch
from PIL import Image

from mgpt4.chat import terminal as chat
from mgpt4.chat.session import (
    ChatError,
    ChatSession,
    GenerationSettings,
    ImageLimits,
    ImageRejected,
    drop_oldest_exchange,
    load_image,
    visible_reply,
)
from mgpt4.images import CLIP_MEAN, CLIP_STD, eval_transform
from mgpt4.inference import ModelSource, load_model, model_config
from mgpt4.inference.flags import add_model_args, source_from_args
from mgpt4.inference.placement import place_vision
from mgpt4.model.prompts import Conversation, displayable
from tests.chat_fixtures import Terminal, python_module, readable_tiny_model, write_checkpoint, write_image

GREEDY = GenerationSettings(max_new_tokens=8, sample=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    return readable_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return write_checkpoint(model, str(tmp_path_factory.mktemp("trained")))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_image(str(tmp_path_factory.mktemp("img") / "flag.png"))


def model_args(*argv: str) -> ModelSource:
    """The model source that these model flags give, as every tool reads them."""
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return source_from_args(parser.parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------
# Images


def generated(model, image: str, question: str | None, messages=None, settings=GREEDY) -> str:
    """The reference a session's reply is checked against: `MiniGPT4.generate` straight on the
    conversation `messages` (default: just the image) with `question` asked, the image as pixels."""
    conv = Conversation()
    if messages is None:
        conv.add_image()
    else:
        conv.messages = [list(m) for m in messages]
    if question is not None:
        conv.ask(question)
    pixels = eval_transform(load_image(image), 56).unsqueeze(0)
    [reply] = model.generate(pixels, conv.prompt_for_reply(), settings)
    return reply


def test_preprocess_is_the_official_eval_transform(image):
    from torchvision import transforms

    official = transforms.Compose(
        [
            transforms.Resize((56, 56), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    img = load_image(image)
    ours = eval_transform(img, 56).unsqueeze(0)
    assert ours.shape == (1, 3, 56, 56)
    torch.testing.assert_close(ours, official(img).unsqueeze(0))


def test_unusable_uploads_are_rejected_with_the_reason(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    big = write_image(str(tmp_path / "big.png"), size=(300, 200))
    truncated = tmp_path / "cut.png"
    with open(write_image(str(tmp_path / "small.png")), "rb") as f:
        truncated.write_bytes(f.read()[:100])
    limits = ImageLimits(max_bytes=10_000, max_pixels=50_000)
    cases = {
        str(text): "not an image",
        str(empty): "empty",
        str(tmp_path / "missing.png"): "cannot read the file",
        big: r"300x200 pixels; images up to 0\.05 megapixels",
        str(truncated): "damaged or truncated",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageRejected, match=reason):
            load_image(path, limits)
    with pytest.raises(ImageRejected, match=r"big\.png is \d+ bytes; images up to 100 bytes are accepted"):
        load_image(big, ImageLimits(max_bytes=100))
    assert load_image(big, ImageLimits()).size == (300, 200)


def test_phone_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


# ---------------------------------------------------------------------------------------------
# The session


def test_reply_streams_and_equals_generate(model, image):
    session = ChatSession(model)
    session.set_image(image)
    parts = list(
        session.stream_reply("What is in the picture?", GenerationSettings(max_new_tokens=12, sample=False))
    )
    assert len(parts) > 3, parts
    assert all(b.startswith(a) for a, b in itertools.pairwise(parts)), parts
    conv = Conversation()
    conv.add_image()
    conv.ask("What is in the picture?")
    pixels = eval_transform(load_image(image), 56).unsqueeze(0)
    [expected] = model.generate(pixels, conv.prompt_for_reply(), max_new_tokens=12)
    assert parts[-1] == expected and re.search(r"[A-Za-z]{2}", expected)
    conv.add_reply(expected)
    assert session.conversation == conv


def test_turns_follow_the_vicuna_template_and_reset_forgets(model, image):
    session = ChatSession(model)
    session.set_image(image)
    first = session.reply("What is in the picture?", GREEDY)
    second = session.reply("Which colour is on the left?", GREEDY)
    prompt = session.conversation.prompt_for_reply()
    assert f"What is in the picture?###Assistant: {first}###Human: Which colour is on the left?" in prompt
    assert prompt.endswith(f"###Assistant: {second}###Assistant: ")
    session.reset()
    assert session.has_image and session.conversation.messages == [["Human: ", "<Img><ImageHere></Img>"]]
    assert session.reply("What is in the picture?", GREEDY) == first


def test_beam_search_gives_the_reply_whole_and_temperature_zero_is_greedy(model, image):
    session = ChatSession(model)
    session.set_image(image)
    greedy = session.reply("What is in the picture?", GREEDY)
    session.reset()
    zero = GenerationSettings(max_new_tokens=8, sample=True, temperature=0.0)
    assert not zero.do_sample and session.reply("What is in the picture?", zero) == greedy
    session.reset()
    beams = GenerationSettings(max_new_tokens=8, num_beams=3)  # sampled beams: seeded alike below
    torch.manual_seed(0)
    parts = list(session.stream_reply("What is in the picture?", beams))
    assert len(parts) == 1 and parts[0]
    torch.manual_seed(0)
    assert parts[0] == generated(model, image, "What is in the picture?", settings=beams)
    session.reset()
    sampling = GenerationSettings(max_new_tokens=8, temperature=1.5)
    torch.manual_seed(0)
    sampled = session.reply("What is in the picture?", sampling)
    assert isinstance(sampled, str)
    # The same seed draws the same reply in another session: what was sampled is the session's doing.
    reference = ChatSession(model)
    reference.set_image(image)
    torch.manual_seed(0)
    assert reference.reply("What is in the picture?", sampling) == sampled


def test_questions_the_session_cannot_answer(model, image):
    session = ChatSession(model)
    with pytest.raises(ChatError, match="no image"):
        session.reply("hello?")
    session.set_image(image)
    with pytest.raises(ChatError, match="empty"):
        session.reply("   ")
    for bad, what in (
        (GenerationSettings(top_p=0), "top_p"),
        (GenerationSettings(num_beams=0), "num_beams"),
        (GenerationSettings(temperature=-1), "temperature"),
        (GenerationSettings(max_new_tokens=3000), "max_new_tokens"),
    ):
        with pytest.raises(ChatError, match=what):
            session.reply("hello?", bad)
    # Refused questions leave no trace in the conversation.
    assert session.conversation.messages == [["Human: ", "<Img><ImageHere></Img>"]]


def test_closing_the_stream_stops_generation_and_keeps_what_was_said(model, image):
    session = ChatSession(model)
    session.set_image(image)
    stream = session.stream_reply(
        "What is in the picture?", GenerationSettings(max_new_tokens=400, sample=False)
    )
    first = next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "mgpt4-generate"]
    role, said = session.conversation.messages[-1]
    assert role == "Assistant: " and said.startswith(first)
    # The conversation goes on from there: as generate goes on from the conversation the session kept.
    kept = [list(m) for m in session.conversation.messages]
    reply = session.reply("And then?", GREEDY)
    assert reply and reply == generated(model, image, "And then?", kept)


def test_long_conversations_are_cut_to_max_context(model, image):
    session = ChatSession(model)
    session.set_image(image)
    long_question = "describe the picture " * 150  # > the tiny LLM's 512 positions
    settings = GenerationSettings(max_new_tokens=8, sample=False, max_context=200)
    for _ in range(2):
        reply = session.reply(long_question, settings)
        # The reply is generate's on the conversation the session kept (cut to fit), the reply excepted.
        kept = session.conversation.messages
        assert kept[-1][1] == reply
        assert reply and reply == generated(model, image, None, kept[:-1], settings)


def test_visible_reply_hides_a_stop_sequence_being_written():
    assert visible_reply(" a red circle") == "a red circle"
    assert visible_reply(" a red circle #") == "a red circle"
    assert visible_reply(" a red circle ##") == "a red circle"
    assert visible_reply(" a red circle ###Human: more") == "a red circle"


# ---------------------------------------------------------------------------------------------
# Model flags: checkpoint loading and the low-memory options


def test_checkpoint_flags_give_the_trained_model(model, checkpoint, image):
    loaded = load_model(model_args("--checkpoint", checkpoint, "--device", "cpu"))
    session = ChatSession(loaded)
    session.set_image(image)
    reference = ChatSession(model)
    reference.set_image(image)
    assert session.reply("What is in the picture?", GREEDY) == reference.reply(
        "What is in the picture?", GREEDY
    )


def test_llm_in_bf16(checkpoint, image):
    loaded = load_model(model_args("--checkpoint", checkpoint, "--device", "cpu", "--llm-dtype", "bf16"))
    assert loaded.llm.lm_head.weight.dtype == torch.bfloat16
    assert loaded.visual_encoder.patch_embed.proj.weight.dtype == torch.float32
    session = ChatSession(loaded)
    session.set_image(image)
    reply = session.reply("What is in the picture?", GREEDY)
    assert reply and reply == generated(loaded, image, "What is in the picture?")


def test_llm_in_8bit_needs_cuda_and_says_so(checkpoint):
    with pytest.raises(SystemExit, match=r"--llm-8bit needs a CUDA device.*--llm-dtype bf16"):
        load_model(model_args("--checkpoint", checkpoint, "--device", "cpu", "--llm-8bit"))


def test_vision_on_cpu_runs_in_fp32_and_hands_embeddings_to_the_llm(checkpoint, image):
    loaded = load_model(
        model_args(
            "--checkpoint",
            checkpoint,
            "--device",
            "cpu",
            "--set",
            "precision.vit=bf16",
            "--llm-dtype",
            "bf16",
        )
    )
    assert loaded.visual_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    place_vision(loaded, "cpu")
    assert loaded.visual_encoder.patch_embed.proj.weight.dtype == torch.float32
    assert next(loaded.qformer.parameters()).dtype == torch.float32
    embeds = loaded.encode_img(torch.zeros(1, 3, 56, 56, dtype=torch.float64))
    assert embeds.dtype == torch.bfloat16 and embeds.device == loaded.llm.lm_head.weight.device
    session = ChatSession(loaded)
    session.set_image(image)
    reply = session.reply("What is in the picture?", GREEDY)
    assert reply and reply == generated(loaded, image, "What is in the picture?")


@pytest.mark.gpu
def test_vision_on_cpu_llm_on_gpu(checkpoint, image):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (gpu marker)")
    loaded = load_model(
        model_args(
            "--checkpoint", checkpoint, "--device", "cuda", "--vision-device", "cpu", "--llm-dtype", "bf16"
        )
    )
    assert loaded.visual_encoder.patch_embed.proj.weight.device.type == "cpu"
    assert loaded.llm.lm_head.weight.device.type == "cuda"
    session = ChatSession(loaded)
    session.set_image(image)
    assert session.img_embeds.device.type == "cuda"
    reply = session.reply("What is in the picture?", GREEDY)
    assert reply and reply == generated(loaded, image, "What is in the picture?")


# ---------------------------------------------------------------------------------------------
# The terminal chat


def test_terminal_chat_as_a_person_uses_it(model, checkpoint, image):
    reference = ChatSession(model)
    reference.set_image(image)
    expected = [
        reference.reply(q, GREEDY) for q in ("What is in the picture?", "Which colour is on the left?")
    ]
    term = Terminal(
        python_module(
            "mgpt4.chat", "--image", image, "--checkpoint", checkpoint, "--greedy", "--max-new-tokens", "8"
        )
    )
    try:
        term.read_until(r"Image: .*flag\.png \(96x64\).*You: ", timeout=60)
        term.type("What is in the picture?\n")
        first = term.read_until(r"MiniGPT-4: ([^\n]*)\n+You: ").group(1).strip()
        term.type("Which colour is on the left?\n")
        second = term.read_until(r"MiniGPT-4: ([^\n]*)\n+You: ").group(1).strip()
        assert [first, second] == expected
        term.type("/image /no/such/picture.png\n")
        term.read_until(r"! picture\.png: cannot read the file.*You: ")
        term.type("/reset\n")
        term.read_until(r"\(conversation cleared\).*You: ")
        term.type("What is in the picture?\n")
        assert term.read_until(r"MiniGPT-4: ([^\n]*)\n+You: ").group(1).strip() == expected[0]
        term.type("/quit\n")
        assert term.close() == 0
    finally:
        term.kill()


def test_terminal_chat_ends_cleanly_at_end_of_input(model, checkpoint, image, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the picture?\n/help\n"))
    chat.main(
        ["--image", image, "--checkpoint", checkpoint, "--device", "cpu", "--greedy", "--max-new-tokens", "4"]
    )
    out = capsys.readouterr().out
    expected = generated(model, image, "What is in the picture?", settings=GREEDY.replace(max_new_tokens=4))
    assert re.search(r"MiniGPT-4: \S+", out) and f"MiniGPT-4: {expected}\n" in out and "/reset" in out
    assert out.endswith("You: \n")


def test_terminal_chat_refuses_a_file_that_is_not_an_image(checkpoint, tmp_path, capsys):
    bad = tmp_path / "report.pdf"
    bad.write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--image", str(bad), "--checkpoint", checkpoint, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "report.pdf is not an image" in capsys.readouterr().out


def test_generation_flags_are_checked_before_loading(checkpoint, image):
    with pytest.raises(SystemExit, match="top_p"):
        chat.main(["--image", image, "--checkpoint", checkpoint, "--top-p", "0"])


def test_ctrl_c_stops_a_reply_and_keeps_what_was_said(model, image, capsys):
    session = ChatSession(model)
    session.set_image(image)
    real = session.stream_reply

    def interrupted(question, settings):
        stream = real(question, settings)
        yield next(stream)
        yield next(stream)
        raise KeyboardInterrupt  # as if it landed while the reader waited for the next token

    session.stream_reply = interrupted
    chat.say(session, "What is in the picture?", GenerationSettings(max_new_tokens=50, sample=False))
    out = capsys.readouterr().out
    printed = re.fullmatch(r"MiniGPT-4: (\S.*) \[stopped\]\n", out)
    assert printed, out
    role, said = session.conversation.messages[-1]
    assert role == "Assistant: " and said.startswith(printed.group(1))
    # What was printed is the start of the whole reply, as generate gives it.
    whole = generated(model, image, "What is in the picture?", settings=GREEDY.replace(max_new_tokens=50))
    assert whole.startswith(printed.group(1)) and len(printed.group(1)) < len(whole)
    assert not [t for t in threading.enumerate() if t.name == "mgpt4-generate"]


# ---------------------------------------------------------------------------------------------
# Issue 16 (chat) and issue 11.13: long chats keep the image


def _captured_contexts(model, monkeypatch) -> list[torch.Tensor]:
    """Every inputs_embeds the LLM is asked to continue, as it is asked."""
    seen: list[torch.Tensor] = []
    real = model.llm.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(model.llm, "generate", spy)
    return seen


def _holds(context: torch.Tensor, block: torch.Tensor) -> bool:
    n = block.shape[0]
    return any(torch.equal(context[k : k + n], block) for k in range(context.shape[0] - n + 1))


def test_ten_long_turns_keep_the_image_in_the_context(model, image, monkeypatch):
    session = ChatSession(model)
    session.set_image(image)
    contexts = _captured_contexts(model, monkeypatch)
    settings = GenerationSettings(max_new_tokens=40, sample=False, max_context=256)
    for turn in range(10):
        reply = session.reply(f"Tell me more about part {turn} of the picture.", settings)
        # Long replies: the readable model never stops before max_new_tokens.
        assert len(model.tokenizer(reply, add_special_tokens=False)["input_ids"]) >= 30
    # Turn ten: the image embeddings are still in the context, and the context fits.
    assert _holds(contexts[-1][0], session.img_embeds[0].to(contexts[-1].dtype))
    assert contexts[-1].shape[1] <= settings.max_context - settings.max_new_tokens
    prompt = session.conversation.prompt_for_reply()
    system = session.conversation.template.system
    assert system and prompt.startswith(system) and prompt.count("<Img><ImageHere></Img>") == 1
    assert "part 0 of" not in prompt and "part 9 of the picture" in prompt  # the oldest turns went
    notices = session.take_notices()  # everything said over the ten turns: once
    assert len(notices) == 1 and "oldest questions and answers are left out" in notices[0]
    # The conversation alternates as the template expects: image turn with a question, then pairs.
    roles = [role for role, _ in session.conversation.messages]
    assert roles[0] == "Human: " and roles == ["Human: ", "Assistant: "] * (len(roles) // 2)
    assert session.conversation.messages[0][1].startswith("<Img><ImageHere></Img> Tell me more")


def test_dropping_exchanges_keeps_a_lone_image_turn_and_stops_at_the_last_question():
    conv = Conversation()
    conv.messages = [
        ["Human: ", "<Img><ImageHere></Img>"],
        ["Human: ", "q1"],
        ["Assistant: ", "a1"],
        ["Human: ", "q2"],
    ]
    assert drop_oldest_exchange(conv)
    assert conv.messages == [["Human: ", "<Img><ImageHere></Img>"], ["Human: ", "q2"]]
    assert not drop_oldest_exchange(conv)
    conv = Conversation()
    conv.add_image()
    conv.ask("q1")
    assert not drop_oldest_exchange(conv)  # only the question being asked: nothing to drop


def _scripted_llm(model, monkeypatch, ids: list[int]) -> None:
    """The LLM's generate writes `ids`, fed to the streamer one by one as transformers does."""

    def generate(*args, streamer=None, **kwargs):
        if streamer is not None:
            streamer.put(torch.zeros(1, 0, dtype=torch.long))  # the prompt: none, it was embeddings
            for i in ids:
                streamer.put(torch.tensor([i]))
            streamer.end()
        return torch.tensor([ids])

    monkeypatch.setattr(model.llm, "generate", generate)


@pytest.mark.parametrize(
    "written",
    [
        "A dog 🐕 and a cat 猫 sit on 한국 grass, é\u0301 👍🏽",  # byte-level pieces: emoji, CJK, Hangul
        "Assistant: a red flag",  # the model echoes the role first
        "line one\nline two ###Human: next",
    ],
)
def test_a_streamed_reply_is_printed_once_in_whole_characters(model, image, monkeypatch, capsys, written):
    tok = model.tokenizer
    ids = tok(written, add_special_tokens=False)["input_ids"]
    assert any(p.startswith("<0x") for p in tok.convert_ids_to_tokens(ids)) or "Assistant" in written
    _scripted_llm(model, monkeypatch, ids)
    session = ChatSession(model)
    session.set_image(image)
    parts = list(session.stream_reply("What is in the picture?", GREEDY))
    assert all(b.startswith(a) for a, b in itertools.pairwise(parts)), parts  # never takes text back
    assert not any("\ufffd" in p for p in parts), parts  # never half a character
    final = parts[-1]
    assert final == visible_reply(tok.decode(ids, skip_special_tokens=True), final=True)
    assert session.conversation.messages[-1] == ["Assistant: ", final]
    session.reset()
    chat.say(session, "What is in the picture?", GREEDY)
    assert capsys.readouterr().out == f"MiniGPT-4: {final}\n"  # printed once, never again on a new line


# What a model can write that a terminal would obey: a carriage return (it overwrote `MiniGPT-4:`),
# NUL, an ESC colour sequence and a cursor move, ^N/^O (switch the character set), DEL, a C1 CSI.
CONTROLLED = "ok\rMiniGPT\x00 \x1b[31mred\x1b[0m\x1b[2J \x0e\x0f\x7f\x9b\tend\nnext 🐕 猫 é\u0301 👨\u200d👩"


def test_control_characters_are_shown_escaped_and_the_rest_kept():
    """Issue 20.13: one function for every output path."""
    shown = displayable(CONTROLLED)
    assert shown == (
        "ok\\x0dMiniGPT\\x00 \\x1b[31mred\\x1b[0m\\x1b[2J \\x0e\\x0f\\x7f\\x9b\tend\nnext 🐕 猫 é\u0301 👨\u200d👩"
    )
    assert not [c for c in shown if unicodedata.category(c) == "Cc" and c not in "\n\t"]
    printable = "A dog 🐕 猫 한국 é\u0301 👍🏽 👨\u200d👩\u200d👧 «ﬁ» \u00a0 ∑ \U0001f600\n\tx"
    assert displayable(printable) == printable
    # Per character: the pieces of a stream, escaped one by one, make the escaped whole.
    assert "".join(displayable(CONTROLLED[i : i + 3]) for i in range(0, len(CONTROLLED), 3)) == shown


def test_the_terminal_and_the_web_page_never_pass_control_characters_on(model, image, monkeypatch, capsys):
    ids = model.tokenizer(CONTROLLED, add_special_tokens=False)["input_ids"]
    _scripted_llm(model, monkeypatch, ids)
    session = ChatSession(model)
    session.set_image(image)
    chat.say(session, "What is in the picture?", GREEDY)
    out = capsys.readouterr().out
    assert out.startswith("MiniGPT-4: ok\\x0dMiniGPT\\x00 \\x1b[31mred"), out
    assert not [c for c in out if unicodedata.category(c) == "Cc" and c not in "\n\t"], repr(out)
    assert session.conversation.messages[-1][1].startswith("ok\rMiniGPT\x00")  # the model's context keeps it

    from mgpt4.chat.web import build_demo

    demo = build_demo(model)
    [on_send] = {f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_send"}
    session = ChatSession(model)
    session.set_image(image)
    *_, (history, _, _) = on_send("What\x00 is it?", [], session, 8, 1, False, 1.0, 0.9, 1.0)
    api = json.dumps(history)
    assert "\\u0000" not in api and "\\r" not in api and "\\u001b" not in api, api
    assert history[0]["content"] == "What\\x00 is it?"
    assert history[-1]["content"].startswith("ok\\x0dMiniGPT\\x00 \\x1b[31mred"), history


def test_image_paths_as_terminals_paste_them(tmp_path, monkeypatch):
    folder = tmp_path / "my photos"
    folder.mkdir()
    path = write_image(str(folder / "dog on grass.png"))
    monkeypatch.setenv("HOME", str(tmp_path))
    for typed in (
        path,
        f"'{path}'",
        f'"{path}"  ',
        path.replace(" ", "\\ "),
        "~/my photos/dog on grass.png",
        "'~/my photos/dog on grass.png' ",
        "file://" + path.replace(" ", "%20"),
    ):
        assert chat.image_path(typed) == path, typed
    with pytest.raises(ImageRejected, match=r"give the image's path: /image PATH"):
        chat.image_path("   ")
    with pytest.raises(ImageRejected, match="is a folder"):
        chat.image_path(f"'{folder}'")


def test_terminal_commands_for_images_say_what_is_wrong(model, image, tmp_path, monkeypatch, capsys):
    session = ChatSession(model)
    session.set_image(image)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image\n/image {tmp_path}\n/image '{image}'\n"))
    chat.repl(session, GREEDY)
    out = capsys.readouterr().out
    assert "! give the image's path: /image PATH" in out
    assert f"! {tmp_path} is a folder" in out
    assert f"Image: {image} (96x64)" in out


def test_the_image_is_checked_before_the_model_loads(tmp_path, capsys):
    bad = tmp_path / "holiday.jpg"
    bad.write_text("not a picture")
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint does not exist: it must not be read
        chat.main(["--image", str(bad), "--checkpoint", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert "holiday.jpg is not an image" in out and "Loading the model" not in out


def _weight_flags(checkpoint: str) -> tuple[dict[str, str], list[str]]:
    """The checkpoint's official weight files, and the flags that name them all."""
    from mgpt4.checkpoints import PROJ_FILE, find_checkpoint, read_checkpoint_config

    files = read_checkpoint_config(find_checkpoint(checkpoint))["model"]["weights"]
    files["proj"] = os.path.join(find_checkpoint(checkpoint), PROJ_FILE)
    flags = [f"--{k.replace('_', '-')}" for k in ("eva_vit", "blip2", "llm", "proj")]
    return files, [x for f in flags for x in (f, files[f[2:].replace("-", "_")])]


def test_missing_weight_files_are_named_not_silently_random(checkpoint, image, capsys):
    files, full = _weight_flags(checkpoint)
    with pytest.raises(SystemExit, match=r"no weight file for --eva-vit, --blip2, --llm, --proj: .*random"):
        model_config(model_args("--preset", "tiny"))
    with pytest.raises(SystemExit, match=r"no weight file for --proj: .*--allow-random-weights"):
        model_config(model_args("--preset", "tiny", *full[:6]))
    with pytest.raises(SystemExit, match=r"random LLM still needs a tokenizer"):
        model_config(model_args("--preset", "tiny", "--allow-random-weights"))
    assert model_config(model_args("--preset", "tiny", *full)).weights.proj == files["proj"]
    # Asked for explicitly, random parts are built, with a warning.
    cfg = model_config(model_args("--preset", "tiny", *full[:6], "--allow-random-weights"))
    assert cfg.weights.proj is None and "random weights for --proj" in capsys.readouterr().err
    # The chat, the demo and describe refuse before loading anything.
    with pytest.raises(SystemExit, match=r"no weight file for --llm, --proj"):
        chat.main(["--image", image, "--preset", "tiny", *full[:4]])
    from mgpt4.curate.__main__ import main as curate

    with pytest.raises(SystemExit, match=r"no weight file for --eva-vit, --blip2"):
        curate(["describe", "--images", image, "--out", "unused", "--preset", "tiny", *full[4:]])


def test_a_bad_checkpoint_or_conflicting_flags_are_said_before_loading(checkpoint, image, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^--checkpoint and --preset tiny: give one"):
        chat.main(["--image", image, "--checkpoint", checkpoint, "--preset", "tiny"])
    with pytest.raises(SystemExit, match=r"^--checkpoint .*nowhere: no such file or folder$"):
        chat.main(["--image", image, "--checkpoint", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()  # a folder that is there but holds no checkpoint
    with pytest.raises(SystemExit, match=r"^--checkpoint .*empty: no mgpt4 checkpoint found there$"):
        chat.main(["--image", image, "--checkpoint", str(tmp_path / "empty")])
    assert "Loading the model" not in capsys.readouterr().out


def test_the_llama2_variant_needs_no_blip2_file(checkpoint, tmp_path):
    """No Q-Former, so no --blip2: the README's LLaMA-2 chat command is accepted as written."""
    files, _ = _weight_flags(checkpoint)
    argv = ["--preset", "tiny_llama2", "--eva-vit", files["eva_vit"], "--llm", files["llm"]]
    cfg = model_config(model_args(*argv, "--proj", files["proj"]))
    assert cfg.qformer is None and cfg.weights.blip2 is None
    with pytest.raises(SystemExit, match=r"^no weight file for --proj:"):
        model_config(model_args(*argv))


def test_weight_paths_and_overrides_are_checked_in_one_line(checkpoint, tmp_path):
    files, full = _weight_flags(checkpoint)
    with pytest.raises(SystemExit, match=r"^--set: .*'bogus'"):
        model_config(model_args("--preset", "tiny", *full, "--set", "bogus=1"))
    with pytest.raises(SystemExit, match=r"^--set: .*max_txt_len"):
        model_config(model_args("--preset", "tiny", *full, "--set", "text.max_txt_len=abc"))
    run_folder = os.path.dirname(os.path.dirname(files["proj"]))
    with pytest.raises(
        SystemExit,
        match=r"^--proj .*: expected a weight file, got a folder \(for a run folder, use --checkpoint\)",
    ):
        model_config(model_args("--preset", "tiny", *full[:6], "--proj", run_folder))
    with pytest.raises(SystemExit, match=r"^--llm .*: expected a Hugging Face model folder, got a file"):
        model_config(model_args("--preset", "tiny", *full[:4], "--llm", files["proj"], *full[6:]))
    with pytest.raises(SystemExit, match=r"^--eva-vit .*nowhere.pth: no such file or folder$"):
        model_config(model_args("--preset", "tiny", "--eva-vit", str(tmp_path / "nowhere.pth"), *full[2:]))


def test_a_wrong_device_or_preset_ends_in_one_error_line(checkpoint, image, tmp_path, capsys):
    from mgpt4.chat.web import main as web

    if not torch.cuda.is_available():
        for main in (chat.main, web):
            argv = ["--checkpoint", checkpoint, "--device", "cuda"]
            with pytest.raises(
                SystemExit, match=r"^--device cuda: no CUDA GPU is visible to PyTorch here; use"
            ):
                main(["--image", image, *argv] if main is chat.main else argv)
    with pytest.raises(SystemExit, match=r"^--device gpu: not a device name"):
        chat.main(["--image", image, "--checkpoint", checkpoint, "--device", "gpu"])
    with pytest.raises(SystemExit) as exit_info:
        chat.build_parser().parse_args(["--image", image, "--preset", "vicuna"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --preset: invalid choice: 'vicuna'" in err
    # A preset that is not the one the weight files were made for: named before anything is built.
    _, full = _weight_flags(checkpoint)
    with pytest.raises(SystemExit, match=r"^error: .*the LLM does not match the model config \(--preset"):
        chat.main(["--image", image, "--preset", "vicuna7b", "--device", "cpu", *full])
