"""fix against a real chat-completions server on 127.0.0.1, and with a local Hugging Face model."""

from __future__ import annotations

import email.utils
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from mgpt4.curate.__main__ import main
from mgpt4.curate.chat_api import (
    ChatAPIConfig,
    ChatClient,
    FatalAPIError,
    ItemError,
    TransientReplyError,
    parse_completion,
    retry_after_seconds,
)
from mgpt4.curate.fix import FixConfig, run_fix
from mgpt4.curate.hf_rewriter import PLAIN_TEMPLATE, HFRewriter, HFRewriterConfig
from mgpt4.curate.prompts import FIX_PROMPT, fix_message
from mgpt4.curate.store import read_store
from mgpt4.dist import RankInfo
from tests.chat_fixtures import REPO, subprocess_env
from tests.curate_fixtures import (
    ChatServer,
    completion,
    files_containing,
    make_describe_store,
    one_torch_thread,
    paragraph_of,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


SECRET = "sk-test-9f8e7d6c5b4a-do-not-leak"
# How long a test waits for a subprocess that must end at once before calling it hung: not a bound on
# its speed (it ends in a second), only on a regression that would otherwise hang the suite.
_HANG_GUARD_S = 300


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after_seconds(later, now=1_000_000) == pytest.approx(30.0)
    assert retry_after_seconds(email.utils.formatdate(5, usegmt=True), now=100) == 0.0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>bad gateway</html>", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"object": "chat.completion"}', "no choices"),
        (b'{"choices": []}', "no choices"),
        (b'{"choices": [{"message": {"role": "assistant"}}]}', "not text"),
        (completion("half a sent", finish="length"), "finish_reason=length"),
        (completion("   "), "empty reply"),
        (b'{"error": {"message": "overloaded"}}', "API error"),
    ],
)
def test_malformed_replies_are_item_errors(body, reason):
    with pytest.raises(ItemError, match=reason):
        parse_completion(body)


def test_content_parts_are_joined():
    body = json.dumps({"choices": [{"message": {"content": [{"type": "text", "text": "A cat."}]}}]}).encode()
    assert parse_completion(body) == "A cat."


def test_429_honours_retry_after_and_5xx_backs_off(monkeypatch):
    def respond(req, n):
        if n == 0:
            return 429, {"Retry-After": "7"}, b'{"error": "slow down"}'
        if n == 1:
            return 503, {}, b"busy"
        return 200, {}, completion("A red circle.")

    sleeps: list[float] = []
    with ChatServer(respond) as server:
        cfg = ChatAPIConfig(base_url=server.url, model="m", backoff_base_s=1.0, max_attempts=3)
        client = ChatClient(cfg, api_key=SECRET, sleep=sleeps.append, jitter=lambda: 0.0)
        assert client.complete(fix_message(FIX_PROMPT, "a red circel")) == ("A red circle.", 3)
        assert SECRET not in repr(client)
    assert sleeps == [7.0, 1.0]  # Retry-After as given; then 1 s * 2**1 * (0.5 + 0.5 * jitter 0)
    assert all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in server.requests)
    assert server.requests[0]["json"]["model"] == "m"


def test_a_long_retry_wait_is_said_once_and_a_short_one_is_not():
    def respond(req, n):
        if n == 0:
            return 429, {"Retry-After": "35"}, b'{"error": "slow down"}'
        if n == 1:
            return 503, {}, b"busy"
        return 200, {}, completion("A red circle.")

    said: list[str] = []
    with ChatServer(respond) as server:
        cfg = ChatAPIConfig(base_url=server.url, model="m", backoff_base_s=1.0, max_attempts=3)
        client = ChatClient(cfg, sleep=lambda s: None, jitter=lambda: 0.0, notice=said.append)
        assert client.complete(fix_message(FIX_PROMPT, "a red circel")) == ("A red circle.", 3)
    # The 35 s Retry-After is said with its reason; the 1 s backoff after the 503 is not.
    assert len(said) == 1, said
    assert said[0].startswith(
        "waiting 35 s (as the server's Retry-After asks) before attempt 2 of 3: HTTP 429"
    )


def test_fix_without_progress_bar_logs_the_retry_after_wait(tmp_path, monkeypatch, caplog):
    """Under --no-progress a rate-limited run says why it is quiet (it was silent for 35 s a time)."""
    import mgpt4.curate.chat_api as chat_api

    monkeypatch.setattr(chat_api, "NOTICE_WAIT_S", 0.05)  # a 0.1 s Retry-After counts as long here
    monkeypatch.setenv("MGPT4_TEST_KEY", SECRET)
    make_describe_store(str(tmp_path / "desc"), {"busy": "429 first"})

    def respond(req, n):
        if n == 0:
            return 429, {"Retry-After": "0.1"}, b'{"error": {"message": "rate limited"}}'
        return 200, {}, completion("Fixed.")

    with caplog.at_level("INFO", logger="mgpt4"), ChatServer(respond) as server:
        assert main(_fix_args(tmp_path / "desc", tmp_path / "fix", server.url)) == 0
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting ")]
    assert waits == [
        f"waiting 0 s (as the server's Retry-After asks) before attempt 2 of 3: HTTP 429 from "
        f'{server.url}/chat/completions: {{"error": {{"message": "rate limited"}}}}'
    ], waits


# Each test item's paragraph says how the server treats it.
SCRIPT = {
    "ok1": "a dog on grass",
    "ok2": "a red car parked",
    "ok3": "two cats sleep",
    "busy": "429 first",
    "flaky": "500 then 502 then fine",
    "dropped": "connection dropped once",
    "down": "always 503",
    "notjson": "reply is html",
    "nochoices": "reply has no choices",
    "cut": "reply cut at max tokens",
    "blank": "reply is blank",
    "toolong": "bad request",
}


def scripted(req, n):
    p = paragraph_of(req)
    item = next(k for k, v in SCRIPT.items() if v == p)
    if item == "busy" and n == 0:
        return 429, {"Retry-After": "0"}, b'{"error": {"message": "rate limited"}}'
    if item == "flaky" and n < 2:
        return (500, 502)[n], {}, b"oops"
    if item == "dropped" and n == 0:
        return None
    if item == "down":
        return 503, {}, b"maintenance"
    if item == "notjson":
        return 200, {}, b"<html>hello</html>"
    if item == "nochoices":
        return 200, {}, b'{"object": "chat.completion"}'
    if item == "cut":
        return 200, {}, completion("The image shows", finish="length")
    if item == "blank":
        return 200, {}, completion(" \n ")
    if item == "toolong":
        return 400, {}, b'{"error": {"message": "context too long"}}'
    return 200, {}, completion(f"Fixed: {p}.")


def _fix_args(inp, out, url, *extra):
    return ["fix", "--input", str(inp), "--out", str(out), "--base-url", url, "--model", "test-model",
            "--api-key-env", "MGPT4_TEST_KEY", "--backoff", "0.001", "--max-attempts", "3", "--no-progress", *extra]  # fmt: skip


def test_every_item_ends_fixed_or_failed_and_the_key_never_leaks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MGPT4_TEST_KEY", SECRET)
    make_describe_store(str(tmp_path / "desc"), SCRIPT)
    with ChatServer(scripted) as server:
        assert main(_fix_args(tmp_path / "desc", tmp_path / "fix", server.url, "--concurrency", "4")) == 0
        counts = {k: server.count(v) for k, v in SCRIPT.items()}
        headers = [r["headers"].get("Authorization") for r in server.requests]
    state = read_store(str(tmp_path / "fix"))
    assert sorted(state.records) == sorted(SCRIPT)  # none lost
    assert sorted(state.done()) == ["busy", "dropped", "flaky", "ok1", "ok2", "ok3"]
    assert state.records["ok1"]["text"] == "Fixed: a dog on grass."
    assert state.records["ok1"]["description"] == "a dog on grass"
    assert state.records["flaky"]["attempts"] == 3
    errors = {k: r["error"] for k, r in state.failed().items()}
    assert "gave up after 3 attempts" in errors["down"] and "HTTP 503" in errors["down"]
    assert "not JSON" in errors["notjson"]
    assert "no choices" in errors["nochoices"]
    assert "finish_reason=length" in errors["cut"]
    assert errors["blank"] == "empty reply"
    assert "HTTP 400" in errors["toolong"]
    assert counts == {"ok1": 1, "ok2": 1, "ok3": 1, "busy": 2, "flaky": 3, "dropped": 2, "down": 3,
                      "notjson": 1, "nochoices": 1, "cut": 1, "blank": 1, "toolong": 1}  # fmt: skip
    assert set(headers) == {f"Bearer {SECRET}"}
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "6 done, 6 failed" in captured.err
    assert files_containing(str(tmp_path), SECRET) == []
    # A re-run asks again only for the failed items; --no-retry-failed asks for nothing.
    with ChatServer(scripted) as server:
        assert main(_fix_args(tmp_path / "desc", tmp_path / "fix", server.url, "--no-retry-failed")) == 0
        assert server.requests == []
        assert main(_fix_args(tmp_path / "desc", tmp_path / "fix", server.url)) == 0
        asked = {paragraph_of(r["json"]) for r in server.requests}
    assert asked == {SCRIPT[k] for k in errors}


def test_an_interrupted_run_resumes_without_redoing_finished_items(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MGPT4_TEST_KEY", SECRET)
    texts = {f"item{i}": f"paragraph number {i}" for i in range(8)}
    make_describe_store(str(tmp_path / "desc"), texts)
    served = {"n": 0}

    def revoked_after_three(req, n):
        served["n"] += 1
        if served["n"] > 3:  # the key is revoked mid-run: every item would fail the same way
            return 401, {}, b'{"error": {"message": "invalid api key"}}'
        return 200, {}, completion("Fixed " + paragraph_of(req))

    with ChatServer(revoked_after_three) as server:
        rc = main(_fix_args(tmp_path / "desc", tmp_path / "fix", server.url, "--concurrency", "1"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "check the key in $MGPT4_TEST_KEY" in err and "5 item(s) left pending" in err
    state = read_store(str(tmp_path / "fix"))
    assert len(state.done()) == 3 and not state.failed()  # the refused items are pending, not failed
    with ChatServer(lambda req, n: (200, {}, completion("Fixed " + paragraph_of(req)))) as server:
        assert main(_fix_args(tmp_path / "desc", tmp_path / "fix", server.url, "--concurrency", "3")) == 0
        asked = sorted(paragraph_of(r["json"]) for r in server.requests)
    assert asked == sorted(texts[k] for k in texts if k not in state.done())
    final = read_store(str(tmp_path / "fix"))
    assert sorted(final.done()) == sorted(texts)
    assert SECRET not in err


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("hf_llm")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_local_hf_back_end_fixes_in_batches(tmp_path, hf_folder):
    texts = {"a": "a red circel on blue", "b": "two green squares", "c": "yellow star"}
    make_describe_store(str(tmp_path / "desc"), texts)
    hf = HFRewriterConfig(model_path=hf_folder, device="cpu", batch_size=2, max_new_tokens=5)
    rewriter = HFRewriter(hf)
    assert not rewriter.chat
    assert rewriter.prompt("m") == PLAIN_TEMPLATE.format(message="m")
    replies = rewriter.rewrite([fix_message(FIX_PROMPT, t) for t in texts.values()])
    assert len(replies) == 3 and all((r is None) != (e is None) for r, e in replies)
    cfg = FixConfig(input=str(tmp_path / "desc"), out=str(tmp_path / "fix"), hf=hf, progress=False)
    report = run_fix(cfg, RankInfo(), rewriter=rewriter)
    state = read_store(str(tmp_path / "fix"))
    assert sorted(state.records) == ["a", "b", "c"] and report.done + report.failed == 3
    for item, rec in state.records.items():
        assert rec["description"] == texts[item] and rec["backend"] == "hf"
        assert rec["text"] if rec["status"] == "done" else rec["error"]
    # One batch of the same inputs again gives the same greedy replies (the store holds them).
    again = dict(zip(texts, rewriter.rewrite([fix_message(FIX_PROMPT, t) for t in texts.values()])))
    for item, rec in state.done().items():
        assert again[item][0] == rec["text"]


def test_a_tokenizer_chat_template_is_used(hf_folder):
    rewriter = HFRewriter(HFRewriterConfig(model_path=hf_folder, device="cpu", max_new_tokens=3))
    rewriter.tokenizer.chat_template = (
        "{% for m in messages %}[USER] {{ m['content'] }} [/USER]{% endfor %}[BOT]"
    )
    rewriter.chat = True
    assert rewriter.prompt("fix this") == "[USER] fix this [/USER][BOT]"
    ((reply, error),) = rewriter.rewrite(["fix this"])
    assert (reply is None) != (error is None)


def test_a_long_prompt_is_failed_not_cut(hf_folder):
    rewriter = HFRewriter(
        HFRewriterConfig(model_path=hf_folder, device="cpu", max_new_tokens=3, max_input_tokens=20)
    )
    ((reply, error),) = rewriter.rewrite([fix_message(FIX_PROMPT, "a dog")])
    assert reply is None and "above max_input_tokens=20" in error


def test_bad_flags_name_the_problem(tmp_path, capsys):
    make_describe_store(str(tmp_path / "desc"), {"a": "x"})
    assert main(["fix", "--input", str(tmp_path / "desc"), "--out", str(tmp_path / "f"), "--model", "m"]) == 1
    assert "--base-url and --model go together" in capsys.readouterr().err
    assert main(["fix", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "f"), "--base-url",
                 "http://127.0.0.1:9/v1", "--model", "m"]) == 1  # fmt: skip
    assert "not an mgpt4 curate store" in capsys.readouterr().err
    assert main(["fix", "--input", str(tmp_path / "desc"), "--out", str(tmp_path / "f"), "--base-url", "ftp://x",
                 "--model", "m"]) == 1  # fmt: skip
    assert "must start with http" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Issue 16: an endpoint that never answers, Ctrl-C, cut replies, and the local back end's checks


def _free_port() -> int:
    """A port nothing listens on: bound by the OS for us, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_stops_the_step_and_leaves_every_item_pending(tmp_path, capsys):
    texts = {f"item{i}": f"paragraph {i}" for i in range(5)}
    make_describe_store(str(tmp_path / "desc"), texts)
    url = f"http://127.0.0.1:{_free_port()}/v1"
    rc = main(
        _fix_args(tmp_path / "desc", tmp_path / "fix", url, "--concurrency", "2", "--max-attempts", "6")
    )
    err = capsys.readouterr().err
    assert rc == 2  # an error, not a run that "finished" with every item failed
    assert "no HTTP answer from" in err and "Connection refused" in err and "check --base-url" in err
    assert "5 item(s) left pending" in err
    assert read_store(str(tmp_path / "fix")).records == {}  # nothing failed: the next run does them all


def test_an_endpoint_that_drops_every_connection_is_fatal_after_one_items_tries(tmp_path):
    with ChatServer(lambda req, n: None) as server:
        cfg = ChatAPIConfig(base_url=server.url, model="m", max_attempts=3)
        client = ChatClient(cfg, sleep=lambda s: None)
        with pytest.raises(
            FatalAPIError, match=r"no HTTP answer from .* in 3 attempts; last: connection error"
        ):
            client.complete("a paragraph")
        assert len(server.requests) == 3
    # Once the endpoint has answered anything, a dropped connection is one item's problem again.
    with ChatServer(lambda req, n: (200, {}, completion("ok")) if n == 0 else None) as server:
        client = ChatClient(
            ChatAPIConfig(base_url=server.url, model="m", max_attempts=2), sleep=lambda s: None
        )
        assert client.complete(fix_message(FIX_PROMPT, "p"))[0] == "ok"
        with pytest.raises(ItemError, match="gave up after 2 attempts; last: connection error"):
            client.complete(fix_message(FIX_PROMPT, "p"))


def test_the_failure_summary_gives_each_reason_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MGPT4_TEST_KEY", SECRET)
    make_describe_store(str(tmp_path / "desc"), {"down": SCRIPT["down"], "toolong": SCRIPT["toolong"]})
    with ChatServer(scripted) as server:
        assert main(_fix_args(tmp_path / "desc", tmp_path / "fix", server.url)) == 0
    err = capsys.readouterr().err
    assert "failed      1  gave up after 3 attempts; last: HTTP 503 from <url>: maintenance" in err
    assert 'failed      1  HTTP 400 from <url>: {"error": {"message": "context too long"}}' in err


def test_a_reply_cut_short_in_transit_is_retried_like_a_5xx(tmp_path, monkeypatch):
    with pytest.raises(TransientReplyError, match="JSON cut short"):
        parse_completion(completion("A red circle.")[:-12])
    with pytest.raises(ItemError, match="not JSON") as not_json:
        parse_completion(b"<html>hello</html>")
    assert not isinstance(not_json.value, TransientReplyError)  # a wrong body is not retried
    monkeypatch.setenv("MGPT4_TEST_KEY", SECRET)
    make_describe_store(str(tmp_path / "desc"), {"a": "a red circel", "b": "a blue sqare"})

    def cut_once(req, n):
        body = completion("Fixed: " + paragraph_of(req))
        return 200, {}, body[: len(body) // 2] if n == 0 else body

    with ChatServer(cut_once) as server:
        assert main(_fix_args(tmp_path / "desc", tmp_path / "fix", server.url)) == 0
        assert server.count("a red circel") == 2
    state = read_store(str(tmp_path / "fix"))
    assert sorted(state.done()) == ["a", "b"] and state.records["a"]["attempts"] == 2
    assert state.records["a"]["text"] == "Fixed: a red circel"


def test_ctrl_c_stops_a_fix_run_at_once_and_leaves_the_rest_pending(tmp_path):
    texts = {f"item{i}": f"paragraph number {i}" for i in range(8)}
    make_describe_store(str(tmp_path / "desc"), texts)
    release = threading.Event()

    def slow_or_busy(req, n):
        if paragraph_of(req) == texts["item0"]:
            release.wait()  # a request in flight, answered only once the run is over
        # Everyone else is told to come back in ten minutes.
        return 429, {"Retry-After": "600"}, b'{"error": {"message": "rate limited"}}'

    with ChatServer(slow_or_busy) as server:
        args = _fix_args(tmp_path / "desc", tmp_path / "fix", server.url, "--concurrency", "4")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mgpt4.curate", *args],
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while len(server.requests) < 4:  # four items in flight or waiting to retry
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            sent = len(server.requests)
            proc.send_signal(signal.SIGINT)
            # A run that waits for the held request never exits and one that sleeps out a Retry-After
            # takes ten minutes: this limit only turns those hangs into a failure, it times nothing.
            _, err = proc.communicate(timeout=_HANG_GUARD_S)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    # The work after Ctrl-C: no retry and no new item went out, the request in flight was not awaited.
    assert len(server.requests) == sent == 4
    assert "Traceback" not in err
    assert "fix interrupted: 8 item(s) left pending; run the same command again to resume" in err
    assert read_store(str(tmp_path / "fix")).records == {}  # interrupted items are pending, not failed


def test_the_local_back_end_fails_a_reply_cut_at_max_new_tokens(tmp_path, hf_folder, monkeypatch):
    texts = {"a": "a red circel on blue", "b": "two green squares"}
    make_describe_store(str(tmp_path / "desc"), texts)
    hf = HFRewriterConfig(model_path=hf_folder, device="cpu", batch_size=2, max_new_tokens=4)
    rewriter = HFRewriter(hf)
    # The random model never says EOS in 4 tokens: both replies are cut there.
    assert [e for _, e in rewriter.rewrite([fix_message(FIX_PROMPT, t) for t in texts.values()])] == [
        "reply cut at max_new_tokens=4 (the model did not finish); raise --max-new-tokens"
    ] * 2
    cfg = FixConfig(input=str(tmp_path / "desc"), out=str(tmp_path / "fix"), hf=hf, progress=False)
    report = run_fix(cfg, RankInfo(), rewriter=rewriter)
    assert report.failed == 2 and not read_store(str(tmp_path / "fix")).done()
    # A re-run with the same settings would cut them again: it is not even loading the model.
    monkeypatch.setattr(HFRewriter, "__init__", lambda self, cfg: pytest.fail("the model was loaded"))
    report = run_fix(cfg, RankInfo())
    assert report.mine == 0 and report.unchanged == 2
    monkeypatch.undo()
    # A model that finishes: every word piece is an end token, so each reply is one finished word.
    words = [i for i, p in enumerate(rewriter.tokenizer.convert_ids_to_tokens(list(range(len(rewriter.tokenizer)))))
             if re.fullmatch(r"▁?[A-Za-z]+", p)]  # fmt: skip
    with torch.no_grad():
        keep = torch.zeros(rewriter.model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[words] = True
        rewriter.model.lm_head.weight[~keep] = 0
    rewriter.model.generation_config.eos_token_id = words
    finished = rewriter.rewrite([fix_message(FIX_PROMPT, t) for t in texts.values()])
    assert all(text and err is None for text, err in finished), finished
    # Other settings are another try: the cut items are pending again.
    cfg.hf = HFRewriterConfig(model_path=hf_folder, device="cpu", batch_size=2, max_new_tokens=5)
    report = run_fix(cfg, RankInfo(), rewriter=rewriter)
    assert report.mine == 2 and report.done == 2


def test_hf_model_that_is_not_a_model_folder_is_named_before_anything_is_written(tmp_path, capsys):
    make_describe_store(str(tmp_path / "desc"), {"a": "x"})
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("my notes\n")
    out = tmp_path / "fix"
    rc = main(
        [
            "fix",
            "--input",
            str(tmp_path / "desc"),
            "--out",
            str(out),
            "--hf-model",
            str(folder),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert f"--hf-model {folder}: not a Hugging Face causal LM folder: no config.json; no weights" in err
    assert "no tokenizer (one of tokenizer.json" in err
    assert not out.exists()


def test_help_shows_defaults_and_the_other_back_ends_flags_are_refused(tmp_path, hf_folder, capsys):
    for step, shown in (
        (
            "fix",
            ["requests in flight (default: 8)", "(default: 512)", "(default: OPENAI_API_KEY)"],
        ),
        ("describe", ["images per generate call (default: 8)", "(0: never) (default: 80)", "(default: 300)"]),
    ):
        with pytest.raises(SystemExit) as done:
            main([step, "--help"])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for s in shown:
            assert s in text, (step, s)
    make_describe_store(str(tmp_path / "desc"), {"a": "x"})
    base = ["fix", "--input", str(tmp_path / "desc"), "--out", str(tmp_path / "fix")]
    api = [*base, "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    assert main([*api, "--batch-size", "4", "--max-new-tokens", "9"]) == 1
    assert (
        "--batch-size, --max-new-tokens belong(s) to the local back end (--hf-model)"
        in capsys.readouterr().err
    )
    assert main([*base, "--hf-model", hf_folder, "--concurrency", "4"]) == 1
    assert "--concurrency belong(s) to the endpoint back end (--base-url)" in capsys.readouterr().err
    assert main([*api, "--hf-model", hf_folder]) == 1
    assert "choose one back end" in capsys.readouterr().err
    assert not (tmp_path / "fix").exists()
