"""Chat: image checks and preprocessing, streamed multi-turn replies, low-memory flags, and the
terminal chat driven in a pseudo-terminal the way a person types into it."""

from __future__ import annotations

import argparse
import io
import itertools
import re
import threading

import pytest
import torch
from PIL import Image

from mgpt4.chat import terminal as chat
from mgpt4.chat.flags import add_model_args
from mgpt4.chat.placement import model_from_args, place_vision
from mgpt4.chat.session import (
    ChatError,
    ChatSession,
    GenerationSettings,
    ImageLimits,
    ImageRejected,
    load_image,
    visible_reply,
)
from mgpt4.images import CLIP_MEAN, CLIP_STD, eval_transform
from mgpt4.model.prompts import Conversation
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


def model_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return parser.parse_args(list(argv))


# ---------------------------------------------------------------------------------------------
# Images


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
    parts = list(
        session.stream_reply("What is in the picture?", GenerationSettings(max_new_tokens=8, num_beams=3))
    )
    assert len(parts) == 1 and parts[0]
    session.reset()
    torch.manual_seed(0)
    sampled = session.reply("What is in the picture?", GenerationSettings(max_new_tokens=8, temperature=1.5))
    assert isinstance(sampled, str)


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
    # The conversation goes on from there.
    assert session.reply("And then?", GREEDY)


def test_long_conversations_are_cut_to_max_context(model, image):
    session = ChatSession(model)
    session.set_image(image)
    long_question = "describe the picture " * 150  # > the tiny LLM's 512 positions
    settings = GenerationSettings(max_new_tokens=8, sample=False, max_context=200)
    assert session.reply(long_question, settings)
    assert session.reply(long_question, settings)


def test_visible_reply_hides_a_stop_sequence_being_written():
    assert visible_reply(" a red circle") == "a red circle"
    assert visible_reply(" a red circle #") == "a red circle"
    assert visible_reply(" a red circle ##") == "a red circle"
    assert visible_reply(" a red circle ###Human: more") == "a red circle"


# ---------------------------------------------------------------------------------------------
# Model flags: checkpoint loading and the low-memory options


def test_checkpoint_flags_give_the_trained_model(model, checkpoint, image):
    loaded = model_from_args(model_args("--checkpoint", checkpoint, "--device", "cpu"))
    session = ChatSession(loaded)
    session.set_image(image)
    reference = ChatSession(model)
    reference.set_image(image)
    assert session.reply("What is in the picture?", GREEDY) == reference.reply(
        "What is in the picture?", GREEDY
    )


def test_llm_in_bf16(checkpoint, image):
    loaded = model_from_args(model_args("--checkpoint", checkpoint, "--device", "cpu", "--llm-dtype", "bf16"))
    assert loaded.llm.lm_head.weight.dtype == torch.bfloat16
    assert loaded.visual_encoder.patch_embed.proj.weight.dtype == torch.float32
    session = ChatSession(loaded)
    session.set_image(image)
    assert session.reply("What is in the picture?", GREEDY)


def test_llm_in_8bit_needs_cuda_and_says_so(checkpoint):
    with pytest.raises(SystemExit, match=r"--llm-8bit needs a CUDA device.*--llm-dtype bf16"):
        model_from_args(model_args("--checkpoint", checkpoint, "--device", "cpu", "--llm-8bit"))


def test_vision_on_cpu_runs_in_fp32_and_hands_embeddings_to_the_llm(checkpoint, image):
    loaded = model_from_args(
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
    assert session.reply("What is in the picture?", GREEDY)


@pytest.mark.gpu
def test_vision_on_cpu_llm_on_gpu(checkpoint, image):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (gpu marker)")
    loaded = model_from_args(
        model_args(
            "--checkpoint", checkpoint, "--device", "cuda", "--vision-device", "cpu", "--llm-dtype", "bf16"
        )
    )
    assert loaded.visual_encoder.patch_embed.proj.weight.device.type == "cpu"
    assert loaded.llm.lm_head.weight.device.type == "cuda"
    session = ChatSession(loaded)
    session.set_image(image)
    assert session.img_embeds.device.type == "cuda"
    assert session.reply("What is in the picture?", GREEDY)


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


def test_terminal_chat_ends_cleanly_at_end_of_input(checkpoint, image, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the picture?\n/help\n"))
    chat.main(
        ["--image", image, "--checkpoint", checkpoint, "--device", "cpu", "--greedy", "--max-new-tokens", "4"]
    )
    out = capsys.readouterr().out
    assert re.search(r"MiniGPT-4: \S+", out) and "/reset" in out
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
    assert not [t for t in threading.enumerate() if t.name == "mgpt4-generate"]
