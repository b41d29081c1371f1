"""`python -m mgpt4.serve` through the official `openai` client: replies equal to the chat's, streaming,
three turns about one image, 32 concurrent requests batched with every answer equal to its sequential
one, bad input answered 4xx with the field named (the server answering on afterwards), and SIGTERM
finishing the request in flight."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mgpt4.chat.session import ChatSession
from mgpt4.model.generation import GenerationSettings
from tests.chat_fixtures import readable_tiny_model, write_checkpoint, write_image
from tests.serve_fixtures import ServerProcess, data_url, image_message, png_bytes

GREEDY8 = GenerationSettings(max_new_tokens=8, sample=False)
QUESTIONS = [
    "What is in the picture?",
    "Describe this image in detail.",
    "Which colours do you see at the top left of the picture, and which at the bottom right?",
    "Is there a circle?",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return readable_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return write_checkpoint(model, str(tmp_path_factory.mktemp("trained")))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_image(str(tmp_path_factory.mktemp("img") / "flag.png"))


@pytest.fixture(scope="module")
def server(checkpoint, image):
    s = ServerProcess(
        "--checkpoint", checkpoint, "--served-model-name", "tiny", "--greedy", "--max-new-tokens", "8",
        "--allow-path", os.path.dirname(image), "--max-image-megapixels", "0.05", "--max-body-mb", "1",
        "--max-batch", "32", "--queue-size", "64",
    )  # fmt: skip
    yield s
    s.stop()


def chat_reply(model, image: str, questions: list[str]) -> list[str]:
    """The terminal chat's replies to `questions`, one after the other, about `image`."""
    session = ChatSession(model)
    session.set_image(image)
    return [session.reply(q, GREEDY8) for q in questions]


def ask(client, url: str, question: str, **kw):
    return client.chat.completions.create(model="tiny", messages=[image_message(url, question)], **kw)


def test_a_reply_is_the_chats_reply(server, model, image):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = ask(client, data_url(image), QUESTIONS[1])
    [expected] = chat_reply(model, image, [QUESTIONS[1]])
    assert r.choices[0].message.content == expected != ""
    assert r.choices[0].finish_reason == "length"  # the readable tiny model never writes ### or EOS
    session = ChatSession(model)
    session.set_image(image)
    session.conversation.ask(QUESTIONS[1])
    assert r.usage.prompt_tokens == session.prompt_tokens(session.conversation.prompt_for_reply())
    assert r.usage.completion_tokens == 8


def test_a_streamed_reply_comes_in_pieces_that_make_the_whole_reply(server, image):
    client = server.client()
    whole = ask(client, data_url(image), QUESTIONS[0]).choices[0].message.content
    chunks = list(
        ask(client, data_url(image), QUESTIONS[0], stream=True, stream_options={"include_usage": True})
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_three_turns_about_one_image_are_the_chats(server, model, image):
    client = server.client()
    questions = QUESTIONS[:3]
    expected = chat_reply(model, image, questions)
    messages, got = [], []
    for k, q in enumerate(questions):
        messages.append(image_message(data_url(image), q) if k == 0 else {"role": "user", "content": q})
        reply = client.chat.completions.create(model="tiny", messages=messages).choices[0].message.content
        messages.append({"role": "assistant", "content": reply})
        got.append(reply)
    assert got == expected
    assert len(set(got)) > 1  # the turns are answered each in its own context


def test_32_concurrent_requests_are_batched_and_each_equals_its_sequential_answer(server, image):
    client = server.client()
    url = data_url(image)
    # Different lengths, so the batch is left-padded; some sampled with a seed, which batching must not change.
    jobs = [
        (QUESTIONS[k % 4] + " Please." * (k % 5), {} if k % 3 else {"temperature": 0.9, "seed": k})
        for k in range(32)
    ]
    sequential = [ask(client, url, q, **kw).choices[0].message.content for q, kw in jobs]
    before = httpx.get(server.base_url.removesuffix("/v1") + "/health").json()["batches"]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(
            pool.map(lambda job: ask(client, url, job[0], **job[1]).choices[0].message.content, jobs)
        )
    health = httpx.get(server.base_url.removesuffix("/v1") + "/health").json()
    assert concurrent == sequential
    assert all(concurrent)
    assert health["largest_batch"] > 1 and health["batches"] - before < 32  # batched, not one by one


def test_bad_input_is_a_4xx_naming_the_problem_and_the_server_answers_on(server, image, tmp_path):
    client = server.client()
    good = data_url(image)
    url = server.base_url + "/chat/completions"

    def refused(status: int, words: str, **kw) -> None:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**{"model": "tiny", **kw})
        assert e.value.status_code == status, e.value.message
        assert words in e.value.message, e.value.message

    r = httpx.post(
        url, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    refused(400, "not an image that can be read", messages=[image_message(data_url(b"hello, world"), "hi")])
    refused(400, "400x300 pixels", messages=[image_message(data_url(png_bytes((400, 300))), "hi")])
    refused(404, "`gpt-4o` is not served here", messages=[image_message(good, "hi")], model="gpt-4o")
    refused(400, "must hold the image", messages=[{"role": "user", "content": "What is in the picture?"}])
    refused(400, "context is 512 tokens", messages=[image_message(good, "Describe this image. " * 200)])
    refused(
        400, "remote image URLs are refused", messages=[image_message("https://example.com/cat.jpg", "hi")]
    )
    refused(400, "outside the allowed folders", messages=[image_message(str(tmp_path / "x.png"), "hi")])
    refused(400, "one image", messages=[image_message(good, "hi"), image_message(good, "and this?")])
    refused(400, "reserved for the image", messages=[image_message(good, "<ImageHere> twice")])
    refused(400, "max_tokens: at most", messages=[image_message(good, "hi")], max_tokens=100_000)
    refused(400, "top_p", messages=[image_message(good, "hi")], top_p=0)
    refused(400, "max_token: not a field", messages=[image_message(good, "hi")], extra_body={"max_token": 5})
    refused(413, "over 1.0 MB", messages=[image_message(data_url(os.urandom(2**20)), "hi")])
    # A local path under --allow-path is read; afterwards the server still answers.
    assert ask(client, image, "hi").choices[0].message.content
    assert ask(client, good, QUESTIONS[0]).choices[0].message.content


def test_sigterm_finishes_the_request_in_flight_then_exits(checkpoint, image):
    s = ServerProcess("--checkpoint", checkpoint, "--greedy", "--max-new-tokens", "8")
    try:
        client = s.client()
        stream = client.chat.completions.create(
            model=s.name, messages=[image_message(data_url(image), "hi")], max_tokens=400, stream=True
        )
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices[0].delta.role == "assistant"
        s.proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"  # all 400 tokens, not cut by the signal
        assert s.proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    finally:
        s.stop()
