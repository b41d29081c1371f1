"""One run per run folder, and resumes that honour what changed: a locked folder refuses a second run,
a dropped data setting is a change, a changed optimizer setting applies as it reads from the resumed
step, and a checkpoint resumes under another precision."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys

import pytest
import torch

from mgpt4.config import OptimConfig
from mgpt4.data import DataConfig, SourceConfig, build_loader
from mgpt4.data.loader import DataStateMismatch
from mgpt4.train import run_lock
from mgpt4.train.optim import build_optimizer, lr_at, resume_schedule
from tests.data_fixtures import numbered_shards, tiny_tokenizer
from tests.launch import read_jsonl, run

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


# ---------------------------------------------------------------------------------------------
# The lock


def test_a_held_folder_refuses_a_second_lock_naming_the_holder(tmp_path):
    out = str(tmp_path / "run")
    first = run_lock.lock_folder(out)
    holder = json.loads(pathlib.Path(out, run_lock.LOCK_FILE).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    # flock belongs to an open file: a second open, even in this process, is another run.
    with pytest.raises(run_lock.RunFolderLocked) as err:
        run_lock.lock_folder(out)
    assert f"host {holder['host']}, pid {os.getpid()}, started {holder['started']}" in str(err.value)
    assert "train.output_dir" in str(err.value)
    first.release()
    assert not os.path.exists(out)  # created by the lock and left empty: removed again
    second = run_lock.lock_folder(out)
    second.release()


def test_a_lock_file_left_by_a_dead_run_is_taken_over_with_a_message(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    stale = {"host": "node7", "pid": 4242, "started": "2026-01-01T00:00:00Z"}
    (out / run_lock.LOCK_FILE).write_text(json.dumps(stale))  # a file, but no process holds its lock
    lock = run_lock.lock_folder(str(out))
    assert "left by a run that ended without releasing it (host node7, pid 4242" in caplog.text
    assert json.loads((out / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # the folder it did not create stays


@slow
def test_a_run_into_a_locked_folder_stops_at_once_and_writes_nothing(tmp_path, cache):
    out = tmp_path / "run"
    held = run_lock.lock_folder(str(out))  # another run, as far as the launched one can tell
    try:
        proc = run(
            [sys.executable, "launchers/pretrain.py", "--set", f"train.output_dir={out}", "--set", "train.steps=2"],
            cache,
        )  # fmt: skip
        assert proc.returncode != 0, proc.stdout[-3000:]
        assert "Traceback" not in proc.stdout and "step 1/" not in proc.stdout, proc.stdout[-3000:]
        assert (
            f"is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, started"
            in proc.stdout
        )
        assert sorted(p.name for p in out.iterdir()) == [run_lock.LOCK_FILE]  # nothing written
    finally:
        held.release()


# ---------------------------------------------------------------------------------------------
# A data setting dropped on resume


L = 12


def _state(cfg: DataConfig, contexts=()) -> dict:
    loader = build_loader(cfg, tiny_tokenizer(), L, "\n", context_lengths=contexts)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    return state


@pytest.mark.parametrize(
    "setting,expected",
    [
        (
            {"pack_length": 64, "pack_rows": 2},
            ["pack_length: saved 64, now unset", "pack_rows: saved 2, now unset"],
        ),
        ({"crops": "sample"}, ["crops: saved 'sample', now unset"]),
    ],
)
def test_a_data_setting_dropped_on_resume_is_a_change(tmp_path, setting, expected):
    shards = numbered_shards(str(tmp_path), 3, 6)
    plain = {"sources": [SourceConfig(name="laion", shards=shards)], "batch_size": 2, "num_workers": 0,
             "image_size": 16, "shuffle_buffer": 3}  # fmt: skip
    contexts = (9,)  # BOS and 8 image tokens: what packing needs to know
    with_setting = _state(DataConfig(**plain, **setting), contexts)
    resumed = build_loader(DataConfig(**plain), tiny_tokenizer(), L, "\n", context_lengths=contexts)
    with pytest.raises(DataStateMismatch) as err:
        resumed.load_state_dict(with_setting)
    for line in expected:
        assert line in str(err.value)
    # The other way round, as before.
    plain_state = _state(DataConfig(**plain), contexts)
    again = build_loader(DataConfig(**plain, **setting), tiny_tokenizer(), L, "\n", context_lengths=contexts)
    with pytest.raises(DataStateMismatch, match=expected[0].split(":")[0] + ": saved unset"):
        again.load_state_dict(plain_state)
    # Unchanged settings still continue.
    build_loader(DataConfig(**plain), tiny_tokenizer(), L, "\n", context_lengths=contexts).load_state_dict(
        plain_state
    )


def test_a_changed_data_setting_names_both_ways_out(monkeypatch):
    """Packing turned on in the quickstart's folder: the refusal offers a fresh data pass there, and a
    new run folder (which the tiny run needs: its 40 steps are done)."""
    from mgpt4.checkpoints import ResumeError, ResumePoint
    from mgpt4.train import resume

    class Run:
        def load_state_dict(self, state, fresh_data=False):
            raise DataStateMismatch("the data settings changed: pack_length: saved None, now 256")

    monkeypatch.setattr(resume, "read_checkpoint", lambda folder, rank: {"step": 40, "samples_seen": 320})
    point = ResumePoint("outputs/tiny_stage1/checkpoints/step_00000040", "step_00000040", 1, "tiny_stage1")
    with pytest.raises(ResumeError) as err:
        resume.restore(resume.Start(point), Run(), 0, 1)
    assert "pack_length: saved None, now 256" in str(err.value)
    assert "--set train.resume_data=fresh" in str(err.value)
    assert str(err.value).endswith("--set train.output_dir=<new folder>")


def test_a_source_dropped_on_resume_is_a_change(tmp_path):
    a, b = numbered_shards(str(tmp_path / "a"), 2, 4), numbered_shards(str(tmp_path / "b"), 2, 4, prefix="b")
    common = {"batch_size": 2, "num_workers": 0, "image_size": 16, "shuffle_buffer": 3}
    state = _state(
        DataConfig(sources=[SourceConfig(name="x", shards=a), SourceConfig(name="y", shards=b)], **common)
    )
    state["setup"].pop("sources")  # only the inputs tell: the saved shard list of 'y' has no match now
    resumed = build_loader(
        DataConfig(sources=[SourceConfig(name="x", shards=a)], **common), tiny_tokenizer(), L, "\n"
    )
    with pytest.raises(DataStateMismatch, match="source 'y': in the saved state, not read now"):
        resumed.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Optimizer settings changed on resume


def test_a_resumed_schedule_follows_this_runs_settings_from_the_resumed_step():
    old = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5)
    new = OptimConfig(lr=5e-4, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5)
    model = torch.nn.Linear(4, 4)
    optimizer, scheduler = build_optimizer(model, old, 20)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()
    optimizer, scheduler = build_optimizer(model, new, 20)
    resume_schedule(scheduler, saved)
    assert scheduler.state_dict()["_step_count"] == saved["_step_count"]
    for step in range(10, 20):
        expected = lr_at(step, 20, new)
        assert scheduler.get_last_lr() == pytest.approx([expected] * len(optimizer.param_groups), rel=1e-9)
        assert [g["lr"] for g in optimizer.param_groups] == scheduler.get_last_lr()
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(new.min_lr, rel=1e-9)


def _train(cache: str, out, *sets: str):
    args = [a for kv in (f"train.output_dir={out}", *sets) for a in ("--set", kv)]
    return run([sys.executable, "launchers/pretrain.py", *args], cache)


@slow
def test_a_halved_lr_on_resume_is_the_new_schedules_lr_from_the_resumed_step(tmp_path, cache):
    out = tmp_path / "run"
    common = ("train.steps=6", "train.save_every=3", "train.log_every=1")
    first = _train(cache, out, *common, "train.stop_at=3")
    assert first.returncode == 0, first.stdout[-3000:]
    lr = json.loads((out / "config.json").read_text())["config"]["optim"]["lr"]
    second = _train(cache, out, *common, f"optim.lr={lr / 2}")
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"optim.lr: {lr!r} at the checkpoint, now {lr / 2!r}" in second.stdout
    assert "follow this run's settings from step 3 on" in second.stdout
    config = json.loads((out / "config.json").read_text())["config"]
    o = OptimConfig(**config["optim"])
    assert o.lr == lr / 2
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows[3:]:
        assert r["train/lr"] == pytest.approx(lr_at(r["step"], 6, o), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Another precision on resume


@slow
def test_a_bf16_checkpoint_resumes_as_fp32(tmp_path, cache):
    out = tmp_path / "run"
    common = ("train.steps=4", "train.save_every=2", "train.log_every=1")
    first = _train(cache, out, *common, "train.stop_at=2", "train.precision=bf16")
    assert first.returncode == 0, first.stdout[-3000:]
    saved = torch.load(out / "checkpoints" / "step_00000002" / "run_state.pt", weights_only=True)
    second = _train(cache, out, *common, "train.precision=fp32")
    assert second.returncode == 0, second.stdout[-3000:]
    assert "resumed from step 2" in second.stdout
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["config"]["train"]["precision"] == "fp32"
    # The fp32 run started from the bf16 run's fp32 master weights and moments.
    resumed = torch.load(out / "checkpoints" / "step_00000004" / "run_state.pt", weights_only=True)
    assert resumed["trainable"]["adam_step"] == saved["trainable"]["adam_step"] + 2
    for name, p in saved["trainable"]["params"].items():
        assert resumed["trainable"]["params"][name].dtype == p.dtype == torch.float32
