"""describe: batched generation with the "Continue" rule, failures per item, resume, and ranks."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import tarfile
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp

from mgpt4.curate.__main__ import build_parser
from mgpt4.curate.describe import DescribeConfig, describe_images, generate_rows, run_describe
from mgpt4.curate.prompts import CONTINUE_PROMPT, DESCRIBE_PROMPT
from mgpt4.curate.store import DONE, PartWriter, open_store, part_path, read_store, record
from mgpt4.dist import RankInfo
from mgpt4.inference import load_model
from mgpt4.inference.flags import source_from_args
from mgpt4.model.generation import GREEDY
from tests.curate_fixtures import draw_images, make_stage1_checkpoint, one_torch_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tokenizer):
    from mgpt4.model.presets import tiny

    return make_stage1_checkpoint(str(tmp_path_factory.mktemp("stage1")), tiny(), tokenizer)


@pytest.fixture(scope="module")
def model(stage1):
    args = build_parser().parse_args(["describe", "--images", "x", "--out", "y", "--checkpoint", stage1])
    return load_model(source_from_args(args))


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    draw_images(str(folder), 5, png_every=3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return str(folder)


def _cfg(sources, out, **kw) -> DescribeConfig:
    base = dict(
        images=sources if isinstance(sources, list) else [sources],
        out=str(out),
        decoding=GREEDY.replace(max_new_tokens=6),
        batch_size=2,
        num_workers=0,
        progress=False,
    )
    base.update(kw)
    return DescribeConfig(**base)


def _lines_per_id(out) -> Counter:
    counts: Counter = Counter()
    for name in os.listdir(out):
        if name.startswith("part-"):
            with open(os.path.join(out, name)) as f:
                counts.update(json.loads(line)["id"] for line in f if line.strip())
    return counts


def test_rows_with_their_own_prompts_match_one_by_one_generation(model):
    torch.manual_seed(0)
    imgs = torch.randn(3, 3, 56, 56)
    prompts = [
        DESCRIBE_PROMPT,
        DESCRIBE_PROMPT + "a red circle on a blue background" + CONTINUE_PROMPT,
        "###Human: <Img><ImageHere></Img> two green squares###Assistant: ",
    ]
    expected = [model.generate(imgs[i : i + 1], p, max_new_tokens=8)[0] for i, p in enumerate(prompts)]
    assert len(set(expected)) == 3  # the prompts lead to different answers, so the check means something
    assert generate_rows(model, imgs, prompts, max_new_tokens=8) == expected


def test_short_answers_get_the_continue_turn(model):
    torch.manual_seed(1)
    imgs = torch.randn(2, 3, 56, 56)
    cfg = DescribeConfig(
        images=["x"], out="y", decoding=GREEDY.replace(max_new_tokens=6), continue_below_tokens=0
    )
    plain = describe_images(model, imgs, cfg)
    first = model.generate(imgs, DESCRIBE_PROMPT, max_new_tokens=6)
    assert [r["answers"] for r in plain] == [[a] for a in first]
    assert [r["text"] for r in plain] == first
    cfg.continue_below_tokens = 80
    cont = describe_images(model, imgs, cfg)
    for i, r in enumerate(cont):
        again = model.generate(
            imgs[i : i + 1], DESCRIBE_PROMPT + first[i] + CONTINUE_PROMPT, max_new_tokens=6
        )[0]
        assert r["answers"] == [first[i], again]
        assert r["text"] == f"{first[i].strip()} {again.strip()}".strip()
        assert r["tokens"] < 80


def test_every_image_ends_done_or_failed_with_a_reason(model, images, tmp_path):
    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        data = (tmp_path / "images" / "img_00.jpg").read_bytes()
        info = tarfile.TarInfo("000000007.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "desc"
    cfg = _cfg([images, str(shard)], out, num_workers=1)
    report = run_describe(model, cfg, RankInfo())
    state = read_store(str(out))
    ids = ["000000007", "broken", "img_00", "img_01", "img_02", "img_03", "img_04"]
    assert sorted(state.records) == ids
    assert report.done + report.failed == len(ids) == report.mine
    assert sorted(state.failed()) == ["broken"]
    assert (
        "unreadable image" in state.records["broken"]["error"]
        and "broken.jpg" in state.records["broken"]["error"]
    )
    rec = state.records["000000007"]
    assert rec["source"]["member"] == "000000007.jpg" and rec["text"] and len(rec["answers"]) == 2
    assert state.records["img_02"]["source"]["path"].endswith("img_02.png")


def test_an_interrupted_run_resumes_without_redoing_finished_items(model, images, tmp_path, monkeypatch):
    out = tmp_path / "desc"
    calls = {"n": 0}
    real = model.generate

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return real(*a, **kw)

    monkeypatch.setattr(model, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_describe(model, _cfg(images, out), RankInfo())
    first = read_store(str(out))
    assert len(first.records) == 2  # the first batch (broken.jpg + img_00) was written before the stop
    monkeypatch.setattr(model, "generate", real)
    report = run_describe(model, _cfg(images, out, retry_failed=False), RankInfo())
    assert report.already_done == len(first.done()) and report.mine == 6 - 2
    assert set(_lines_per_id(out).values()) == {1}  # no item was described twice
    assert len(read_store(str(out)).records) == 6
    report = run_describe(model, _cfg(images, out), RankInfo())
    # The broken image failed to decode and its file has not changed: it would fail again (issue 16.5).
    assert report.mine == 0 and report.unchanged == 1
    with open(os.path.join(images, "broken.jpg"), "ab") as f:
        f.write(b" and more bytes")  # now it is another file, worth another try
    report = run_describe(model, _cfg(images, out), RankInfo())
    assert report.mine == 1 and report.failed == 1  # only the broken image is tried again


def _ids_in_part(out, rank: int) -> set[str]:
    with open(part_path(str(out), rank)) as f:
        return {json.loads(line)["id"] for line in f}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, model, cfg, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    r = run_describe(model, cfg)
    queue.put((rank, r.mine, r.done, r.failed))


@pytest.mark.multirank
def test_two_ranks_share_the_pending_items(model, images, tmp_path):
    out = tmp_path / "desc"
    open_store(str(out), "describe", {}, None, 0)
    with PartWriter(str(out), 5) as w:  # done earlier by a run with more ranks
        w.write([record("img_03", DONE, text="earlier", source={"path": "x"})])
    ctx = mp.get_context("fork")  # the children reuse the loaded model: no import or load per rank
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, model, _cfg(images, out), queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted(queue.get(timeout=5) for _ in procs)
    assert [m for _, m, _, _ in results] == [3, 2]  # 5 pending items split 3 + 2
    ids = {r: _ids_in_part(out, r) for r in (0, 1)}
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == {"broken", "img_00", "img_01", "img_02", "img_04"}
    assert len(read_store(str(out)).records) == 6


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_through_the_deepspeed_launcher(stage1, images, tmp_path):
    out = tmp_path / "desc"
    env = dict(os.environ, PYTHONPATH=REPO, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/mgpt4/torch_extensions"))
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "mgpt4.curate"]
    cmd += ["describe", "--images", images, "--out", str(out), "--checkpoint", stage1, "--device", "cpu"]
    cmd += ["--max-new-tokens", "4", "--batch-size", "2", "--num-workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = {r: _ids_in_part(out, r) for r in (0, 1)}
    assert len(ids[0]) == len(ids[1]) == 3 and not ids[0] & ids[1]
    assert "describe rank 1/2" in proc.stdout + proc.stderr
    assert sorted(read_store(str(out)).records) == [
        "broken",
        "img_00",
        "img_01",
        "img_02",
        "img_03",
        "img_04",
    ]


def test_bad_inputs_fail_before_the_model_loads_and_a_finished_run_loads_nothing(
    model, images, tmp_path, capsys
):
    from mgpt4.curate.__main__ import main

    missing_model = ["--checkpoint", str(tmp_path / "no-model"), "--no-progress"]
    assert (
        main(["describe", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), *missing_model])
        == 1
    )
    assert "nope: no such folder, shard or list file" in capsys.readouterr().err
    out = tmp_path / "desc"
    run_describe(model, _cfg(images, out), RankInfo())
    # Everything is done or failed: with --no-retry-failed there is nothing to do, so no model is needed.
    assert main(["describe", "--images", images, "--out", str(out), "--no-retry-failed", *missing_model]) == 0
    assert (
        "0 done, 0 failed (0 continued) of 0 pending here; 5 of 6 were done before" in capsys.readouterr().err
    )


def test_a_bad_set_is_refused_before_anything_is_written(stage1, images, tmp_path, capsys):
    from mgpt4.curate.__main__ import main

    out = tmp_path / "desc"
    argv = ["describe", "--images", images, "--out", str(out), "--checkpoint", stage1, "--set", "bogus=1"]
    with pytest.raises(SystemExit, match=r"^--set: .*unknown key 'bogus'"):
        main(argv)
    assert not out.exists()


def test_a_rerun_with_only_unchanged_unreadable_images_loads_no_model(model, images, tmp_path, capsys):
    """Issue 16.5: what is pending, and whether it can succeed, is decided before the model loads."""
    from mgpt4.curate.__main__ import main

    out = tmp_path / "desc"
    run_describe(model, _cfg(images, out), RankInfo())
    assert sorted(read_store(str(out)).failed()) == ["broken"]
    capsys.readouterr()
    # No --no-retry-failed: failed items are retried by default, but broken.jpg has not changed, so
    # nothing is pending and the (missing) model is never loaded.
    missing_model = ["--checkpoint", str(tmp_path / "no-model"), "--no-progress"]
    assert main(["describe", "--images", images, "--out", str(out), *missing_model]) == 0
    err = capsys.readouterr().err
    assert "0 done, 0 failed (0 continued) of 0 pending here" in err
    assert "1 image(s) could not be read before and have not changed since" in err


def test_generation_errors_are_recorded_and_a_run_of_them_stops_the_step(
    model, images, tmp_path, monkeypatch
):
    def broken(*a, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", broken)
    out = tmp_path / "desc"
    with pytest.raises(RuntimeError, match="2 batches in a row failed"):
        run_describe(model, _cfg(images, out, max_failed_batches=2), RankInfo())
    state = read_store(str(out))
    assert sorted(state.records) == ["broken", "img_00", "img_01", "img_02"]  # two batches, then the stop
    assert "unreadable image" in state.records["broken"]["error"]
    assert state.records["img_01"]["error"] == "generation failed: RuntimeError: out of memory"


def test_describe_asks_in_the_models_conversation_template():
    """The paper's question and its "Continue" turn, in the template of the model that describes: the
    paper's exact prompts for Vicuna v0, Llama-2-Chat turns for the LLaMA-2 variant."""
    from types import SimpleNamespace

    from mgpt4.curate.describe import describe_prompts
    from mgpt4.model.prompts import LLAMA2_CHAT, VICUNA_V0, Conversation

    cfg = DescribeConfig(images=["x"], out="y")
    vicuna = SimpleNamespace(new_conversation=lambda: Conversation(VICUNA_V0))
    first, cont = describe_prompts(vicuna, cfg)
    assert first == DESCRIBE_PROMPT and cont("a dog.") == DESCRIBE_PROMPT + "a dog." + CONTINUE_PROMPT
    llama2 = SimpleNamespace(new_conversation=lambda: Conversation(LLAMA2_CHAT))
    first, cont = describe_prompts(llama2, cfg)
    question = "Describe this image in detail. Give as many details as possible. Say everything you see."
    assert first.endswith(f"<s>[INST] <Img><ImageHere></Img> {question} [/INST] ")
    assert cont("a dog.") == first + "a dog.<s>[INST] Continue [/INST] "
    given = DescribeConfig(images=["x"], out="y", prompt="<Img><ImageHere></Img> What is it? ")
    assert describe_prompts(llama2, given)[0] == "<Img><ImageHere></Img> What is it? "  # used as given
