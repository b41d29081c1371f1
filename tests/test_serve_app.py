"""The server's app in-process (starlette's TestClient on the tiny model): the API key, a full queue
answered 429 with Retry-After, a request's stop strings, per-row sampling in one batch, a cancelled row,
the text held back while streaming, and where images may come from."""

from __future__ import annotations

import base64
import os
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from mgpt4.images import eval_transform
from mgpt4.model.generation import GenerationSettings, RowSampler, RowSampling
from mgpt4.serve.app import Service, create_app
from mgpt4.serve.batcher import Batcher, Job, visible
from tests.chat_fixtures import readable_tiny_model, write_image
from tests.serve_fixtures import data_url, image_message

DEFAULTS = GenerationSettings(max_new_tokens=8, sample=False, max_context=512)


@pytest.fixture(scope="module")
def model(tokenizer):
    return readable_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return data_url(write_image(str(tmp_path_factory.mktemp("img") / "flag.png")))


def service(model, **kw) -> Service:
    batcher = Batcher(model, DEFAULTS, max_batch=kw.pop("max_batch", 8), queue_size=kw.pop("queue_size", 8))
    return Service(model=model, name="tiny", batcher=batcher, defaults=DEFAULTS, **kw)


def body(image: str, question: str = "What is this?", **kw) -> dict:
    return {"model": "tiny", "messages": [image_message(image, question)], **kw}


def test_the_api_key_is_required_when_set(model, image):
    with TestClient(create_app(service(model, api_key="s3cret"))) as client:
        assert client.get("/health").status_code == 200  # liveness needs no key
        r = client.post("/v1/chat/completions", json=body(image))
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/chat/completions", json=body(image), headers=ok).status_code == 200


def test_a_full_queue_is_answered_429_with_retry_after(model, image):
    svc = service(model, max_batch=1, queue_size=1)
    taken, release = threading.Event(), threading.Event()
    run = svc.batcher.run_batch

    def held(jobs):
        taken.set()
        release.wait(60)
        return run(jobs)

    svc.batcher.run_batch = held
    with TestClient(create_app(svc)) as client:
        results: list[int] = []

        def post() -> None:
            results.append(client.post("/v1/chat/completions", json=body(image)).status_code)

        first = threading.Thread(target=post)
        first.start()
        assert taken.wait(60)  # the model thread holds the first request
        second = threading.Thread(target=post)
        second.start()
        deadline = time.monotonic() + 60
        while svc.batcher.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/chat/completions", json=body(image))
        release.set()
        first.join(60)
        second.join(60)
    assert r.status_code == 429 and "busy" in r.json()["error"]["message"]
    assert int(r.headers["Retry-After"]) >= 1
    assert results == [200, 200]  # the two that got in are answered


def test_a_stop_string_ends_the_reply_before_it(model, image):
    with TestClient(create_app(service(model))) as client:
        whole = client.post("/v1/chat/completions", json=body(image)).json()["choices"][0]
        words = whole["message"]["content"].split()
        stop = words[2]
        cut = client.post("/v1/chat/completions", json=body(image, stop=[stop])).json()["choices"][0]
    assert whole["finish_reason"] == "length"
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == whole["message"]["content"].split(stop)[0].strip()


def test_rows_sample_each_by_their_own_settings():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    greedy = RowSampling()
    seeded = [
        RowSampling(temperature=1.5, top_p=0.95, generator=torch.Generator().manual_seed(7)) for _ in range(2)
    ]
    picked = RowSampler([greedy, seeded[0], RowSampling(temperature=1.0, top_p=1e-6)])(None, scores.clone())
    alone = RowSampler([seeded[1]])(None, scores[1:2].clone())
    assert torch.equal(picked[0], scores[0])  # a greedy row is left to generate's argmax
    assert picked[1].argmax() == alone[0].argmax()  # a seeded row draws the same beside others as alone
    assert torch.isfinite(picked[1]).sum() == 1
    assert picked[2].argmax() == scores[2].argmax()  # the nucleus of a tiny top_p is the best token
    draws = {
        int(
            RowSampler([RowSampling(temperature=2.0, generator=torch.Generator().manual_seed(s))])(
                None, scores[:1].clone()
            ).argmax()
        )
        for s in range(20)
    }
    assert len(draws) > 1  # it does sample


def test_text_being_written_holds_back_what_may_change():
    assert visible("a cat ##", ["###"], "Assistant:") == "a cat"
    assert visible("a cat ### Human:", ["###"], "Assistant:") == "a cat"
    assert visible("Assis", ["###"], "Assistant:") == ""
    assert visible(" Assistant: a dog", ["###"], "Assistant:") == "a dog"
    assert visible("caf\ufffd", ["###"], None) == "caf"


def test_a_request_whose_client_went_away_stops_and_its_batch_goes_on(model, image):
    from mgpt4.serve.images import ImagePolicy, decode

    svc = service(model)
    pixels = eval_transform(decode(base64.b64decode(image.split(",")[1]), ImagePolicy(), "image"), 56)
    conv = model.new_conversation()
    conv.add_image()
    conv.ask("What is this?")
    prompt = conv.prompt_for_reply()
    jobs = [
        Job(prompt, pixels, model.layout(prompt).length, max_tokens=20, sampling=RowSampling(), cancelled=c)
        for c in (False, True)
    ]
    done = svc.batcher.run_batch(jobs)
    svc.batcher.close()
    assert [(d.finish_reason, d.completion_tokens) for d in done] == [("length", 20), ("cancelled", 1)]
    [alone] = model.generate_from_embeds(
        [model.encode_img(pixels[None])], prompt, DEFAULTS.replace(max_new_tokens=20)
    )
    assert done[0].text == alone


def test_images_come_only_from_where_the_policy_allows(tmp_path):
    from mgpt4.serve.images import ImagePolicy, read_image
    from mgpt4.serve.protocol import ApiError

    root = tmp_path / "allowed"
    root.mkdir()
    inside = write_image(str(root / "in.png"))
    outside = write_image(str(tmp_path / "out.png"))
    os.symlink(outside, root / "link.png")
    policy = ImagePolicy(allow_paths=(os.path.realpath(root),))
    assert read_image(inside, policy, "url").size == (96, 64)
    assert read_image("file://" + inside, policy, "url").size == (96, 64)
    for url, words in [
        (str(root / "link.png"), "outside the allowed folders"),  # a link cannot lead out of a root
        (str(root / ".." / "out.png"), "outside the allowed folders"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        ("ftp://example.com/a.png", "expected a data: URL"),
    ]:
        with pytest.raises(ApiError, match=words):
            read_image(url, policy, "url")
    with pytest.raises(ApiError, match="local image paths are refused"):
        read_image(inside, ImagePolicy(), "url")


def test_flags_that_cannot_serve_are_one_error_line_before_loading(tmp_path, capsys):
    import socket

    from mgpt4.serve.__main__ import main

    def serve(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(list(args))
        out = capsys.readouterr()
        assert "Loading the model" not in out.out
        return str(e.value.code) if isinstance(e.value.code, str) else out.err.strip().splitlines()[-1]

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = str(busy.getsockname()[1])
    random = ("--preset", "tiny", "--allow-random-weights", "--set", f"weights.tokenizer={tmp_path}")
    try:
        assert f"--port {port}: cannot bind" in serve(*random, "--port", port)
    finally:
        busy.close()
    assert "--allow-path" in serve(*random, "--allow-path", str(tmp_path / "nowhere"))
    assert "--num-beams" in serve(*random, "--num-beams", "2")
    assert "--max-tokens-limit 100" in serve(*random, "--max-tokens-limit", "100")
    assert "give --checkpoint" in serve("--port", "0")
    assert "cannot read it" in serve(*random, "--api-key-file", str(tmp_path / "no-key"))
