"""fix against a real chat-completions server on 127.0.0.1, and with a local Hugging Face model."""

from __future__ import annotations

import email.utils
import json

import pytest

from mgpt4.curate.__main__ import main
from mgpt4.curate.chat_api import ChatAPIConfig, ChatClient, ItemError, parse_completion, retry_after_seconds
from mgpt4.curate.fix import FixConfig, run_fix
from mgpt4.curate.hf_rewriter import PLAIN_TEMPLATE, HFRewriter, HFRewriterConfig
from mgpt4.curate.prompts import FIX_PROMPT, fix_message
from mgpt4.curate.ranks import RankInfo
from mgpt4.curate.store import read_store
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
