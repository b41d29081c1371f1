"""Errors that would lose their context, each stopped with one line naming the cause (issue 20, 8-11):
a full disk during a save, a rendezvous port in use, Ctrl-C, a text file as a weight file, the tiny
assets beside your own LLM, a shard path that is a folder."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mgpt4.train.cli import main
from tests.launch import REPO, deepspeed_cmd, free_port, launcher_env, run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out, out[-4000:]


# ---------------------------------------------------------------------------------------------
# 8. A full disk during a save

# The run's own launcher, with torch.save failing for the step-4 checkpoint as a full disk makes it
# fail: an OSError(ENOSPC) from the file, or torch's zip writer's RuntimeError on a disk with less
# free space than the state needs.
FULL_DISK = """
import errno, shutil, sys, torch
from collections import namedtuple
kind = sys.argv.pop(1)
real_save = torch.save
def save(obj, f, *a, **k):
    if "step_00000004" in str(f):
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        shutil.disk_usage = lambda p: namedtuple("usage", "total used free")(10**9, 10**9 - 512, 512)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 832 vs 726")
    return real_save(obj, f, *a, **k)
torch.save = save
from mgpt4.train.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["enospc", "torch_zip_writer"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, cache, kind):
    from mgpt4.checkpoints import find_resume_point, latest_tag
    from mgpt4.train.run_state import read_checkpoint

    out = tmp_path / "run"
    sets = [f"train.output_dir={out}", "train.steps=6", "train.save_every=2", "train.sample_every=0"]
    proc = run(
        [sys.executable, "-c", FULL_DISK, kind, *(a for s in sets for a in ("--set", s))],
        cache,
    )
    assert proc.returncode != 0
    _no_traceback(proc.stdout)
    [line] = [ln for ln in proc.stdout.splitlines() if "mgpt4: error:" in ln]
    step2, step4 = out / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000004"
    assert line.startswith(f"mgpt4: error: cannot write checkpoint {step4}: the disk is full ("), line
    assert "free there" in line and "needs about" in line, line
    assert f"free some space, then rerun the same command to resume from {step2}" in line, line
    # The last complete checkpoint stays what a rerun resumes from, and it loads.
    assert latest_tag(str(out / "checkpoints")) == "step_00000002"
    assert find_resume_point(str(out)).folder == str(step2)
    assert read_checkpoint(str(step2), 0)["step"] == 2


# ---------------------------------------------------------------------------------------------
# 9. A rendezvous port in use; Ctrl-C


@pytest.mark.slow
def test_a_rendezvous_port_in_use_names_master_port(tmp_path, cache):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cmd = [
            sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
            "launchers/pretrain.py", "--set", f"train.output_dir={tmp_path / 'run'}",
        ]  # fmt: skip
        proc = run(cmd, cache, timeout=300)
    assert proc.returncode != 0
    _no_traceback(proc.stdout)
    [line] = [ln for ln in proc.stdout.splitlines() if "mgpt4: error:" in ln]
    assert f"rendezvous port 127.0.0.1:{port} is in use (EADDRINUSE)" in line, line
    assert "--master_port" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "deepspeed"])
def test_ctrl_c_says_where_the_run_resumes_from(tmp_path, cache, launcher):
    """Ctrl-C in a terminal signals the whole foreground process group; under the deepspeed launcher
    each rank also gets the launcher's SIGTERM at once."""
    out = tmp_path / "run"
    sets = [f"train.output_dir={out}", "train.steps=100000", "train.save_every=2", "train.sample_every=0"]
    env = launcher_env(cache)
    args = ["launchers/pretrain.py", *(a for s in sets for a in ("--set", s))]
    if launcher == "python":
        env["MASTER_PORT"] = str(free_port())
        cmd = [sys.executable, *args]
    else:
        cmd = deepspeed_cmd(*args[:1], 1, *args[1:])
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as a terminal gives a foreground job
    )  # fmt: skip
    try:
        latest = out / "checkpoints" / "latest"
        while not latest.exists():  # the first checkpoint is complete once `latest` names it
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if launcher == "python":  # the launcher's own exit and traceback are DeepSpeed's
        assert proc.returncode == 130, stdout[-4000:]
        _no_traceback(stdout)
        assert "KeyboardInterrupt" not in stdout, stdout[-4000:]
    [line] = [ln for ln in stdout.splitlines() if "mgpt4: interrupted" in ln]
    named = line.split("resume from ", 1)[1]
    # What it names is a complete checkpoint of this run, the one a rerun starts from.
    from mgpt4.checkpoints import find_resume_point

    assert named == find_resume_point(str(out)).folder and os.path.isfile(
        os.path.join(named, "done_rank0.json")
    )


def test_ctrl_c_before_any_checkpoint_says_the_run_starts_over(tmp_path, monkeypatch, capsys):
    import mgpt4.train.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["--set", f"train.output_dir={tmp_path / 'run'}"])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert (
        f"mgpt4: interrupted; rerun the same command to start over: {tmp_path / 'run'} holds no complete"
        in err
    )


# ---------------------------------------------------------------------------------------------
# 10. A text file as a weight file; the tiny assets beside your own LLM


@pytest.mark.parametrize(
    "text",
    [
        "hello world\n",  # torch's unpickler: `KeyError: 101`
        "version https://git-lfs.github.com/spec/v1\noid sha256:4e1b\n",  # `Unsupported operand 118`
    ],
)
def test_a_text_file_as_a_weight_file_is_named(tmp_path, text):
    from mgpt4.model import WeightsError
    from mgpt4.model.loading import read_checkpoint

    path = tmp_path / "eva_vit_g.pth"
    path.write_text(text)
    with pytest.raises(WeightsError) as e:
        read_checkpoint(str(path))
    line = str(e.value)
    assert line.startswith(f"{path}: not a readable torch file: expected what torch.save writes"), line
    assert "\n" not in line.split("but it starts with ")[0] and repr(text.encode()[:40]) in line


def test_the_tiny_assets_make_no_tokenizer_or_llm_beside_your_own_llm(
    tmp_path, monkeypatch, tokenizer, caplog
):
    """tiny_stage1 on your LLM folder with its sizes left to it (`model.llm={}`): only the tiny vision
    files are made, and they load; before, a tiny tokenizer with vocab_size=None failed in sentencepiece."""
    from mgpt4.model import build_model, load_weights
    from mgpt4.strict_config import apply_overrides
    from mgpt4.train.assets import ensure_demo_assets, fill_demo_paths
    from mgpt4.train.recipes import get_recipe
    from tests.conftest import TOKENIZER_CORPUS
    from tests.decoder_folders import write_decoder_folder

    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    folder = write_decoder_folder(str(tmp_path), "mistral", tokenizer, TOKENIZER_CORPUS)
    sets = [f"model.weights.llm={folder}", "model.llm={}", "model.text.prompt_template=null",
            "model.text.end_sym=null", "model.text.template=chat_template"]  # fmt: skip
    cfg = apply_overrides(get_recipe("tiny_stage1"), sets)
    fill_demo_paths(cfg)
    w = cfg.model.weights
    assert w.llm == folder and w.eva_vit.startswith(str(tmp_path / "cache")) and w.blip2
    with caplog.at_level(logging.INFO, logger="mgpt4.train.assets"):
        ensure_demo_assets(cfg)
        # Where a first run's files go is said once, when they are made (a user asked where 20 MB went).
        said = [r.getMessage() for r in caplog.records if r.name == "mgpt4.train.assets"]
        assert said == [f"first use: writing the demo data and tiny weights under {tmp_path / 'cache'}"]
        ensure_demo_assets(cfg)
        assert [r.name for r in caplog.records].count("mgpt4.train.assets") == 1
    made = sorted(os.listdir(os.path.dirname(w.eva_vit)))
    assert made == ["blip2_pretrained.pth", "eva_vit_g.pth"]  # no llm/, no tokenizer
    cfg.validate()
    model = build_model(cfg.model)
    load_weights(model)
    assert model.llm.config.hidden_size != 64  # the folder's LLM, not a tiny one


# ---------------------------------------------------------------------------------------------
# 11. A shard path that is a folder


def test_a_shard_folder_is_refused_by_the_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path / "cache"))
    (tmp_path / "laion").mkdir()
    sources = json.dumps([{"name": "laion", "shards": str(tmp_path / "laion")}])
    with pytest.raises(
        SystemExit, match=r"data\.sources\[0\]\.shards: '.*/laion' is a folder; expected \.tar"
    ):
        main(["--dry-run", "--set", f"data.sources={sources}"])
    with pytest.raises(SystemExit, match=r"data\.val\.shards: '.*/laion' is a folder"):
        main(["--dry-run", "--set", f"data.val.shards={tmp_path / 'laion'}"])


@pytest.mark.slow
def test_a_shard_folder_stops_a_run_before_it_writes_anything(tmp_path, cache):
    (tmp_path / "laion").mkdir()
    out = tmp_path / "run"
    sources = json.dumps([{"name": "laion", "shards": str(tmp_path / "laion")}])
    proc = run(
        [
            sys.executable,
            "launchers/pretrain.py",
            "--set",
            f"train.output_dir={out}",
            "--set",
            f"data.sources={sources}",
        ],
        cache,
    )
    assert proc.returncode != 0
    _no_traceback(proc.stdout)
    assert "is a folder; expected .tar shard files" in proc.stdout
    assert not out.exists()  # no config.json, metrics.jsonl or tensorboard/
