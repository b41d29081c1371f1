"""Restarts that must not lose a run: `latest` missing or dangling, incomplete checkpoints, --no-resume
over an earlier run, stage 2 after stage 1 as the README shows it, another number of ranks, two runs on
one machine, and per-part precision under a bf16 engine."""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mgpt4.checkpoints import (
    FORMAT_VERSION,
    ResumeError,
    find_checkpoint,
    find_resume_point,
    rotate,
    step_dirs,
    write_done,
)
from mgpt4.train.cli import main
from mgpt4.train.optim import lr_at
from mgpt4.train.recipes import get_recipe
from tests.launch import REPO, deepspeed_cmd, launcher_env, on_free_port, read_jsonl, readme_block, run

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


def _train(cache: str, out, *sets: str, script: str = "launchers/pretrain.py", flags: tuple[str, ...] = ()):
    """One process started without a launcher (it picks its own free port)."""
    args = [a for kv in (f"train.output_dir={out}", *sets) for a in ("--set", kv)]
    return run([sys.executable, script, *args, *flags], cache)


def _files(folder) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {
        os.path.relpath(os.path.join(d, f), folder): pathlib.Path(d, f).read_bytes()
        for d, _, names in os.walk(folder)
        for f in names
    }


def _fails_cleanly(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "step 1/" not in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# Which checkpoint a folder resumes from (no training)


def _checkpoint(root, step: int, ranks: list[int], world: int) -> str:
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"recipe": "tiny_stage1"}))
    for r in ranks:
        write_done(str(folder), r, world, step)
    return str(folder)


def test_resume_point_follows_the_markers_not_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 2, [0, 1], 2)
    _checkpoint(root, 4, [0, 1], 2)
    _checkpoint(root, 6, [1], 2)  # rank 0 never finished: a crash mid-save
    (root / "latest").write_text("step_00000004")
    point = find_resume_point(str(tmp_path))
    assert (point.tag, point.world_size, point.recipe, point.note) == ("step_00000004", 2, "tiny_stage1", "")
    (root / "latest").write_text("step_00000002")  # a rollback by hand is honoured
    assert find_resume_point(str(tmp_path)).tag == "step_00000002"
    (root / "latest").unlink()
    point = find_resume_point(str(tmp_path))
    assert point.tag == "step_00000004" and "latest is missing" in point.note
    (root / "latest").write_text("step_00000006")
    point = find_resume_point(str(tmp_path))
    assert point.tag == "step_00000004" and "rank(s) 0 of 2 did not finish" in point.note
    assert find_resume_point(str(tmp_path / "elsewhere")) is None


def test_checkpoints_none_complete_and_legacy_ones(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 2, [0], 2)
    with pytest.raises(
        ResumeError, match=r"none is complete \(step_00000002: rank\(s\) 1 of 2 did not finish"
    ):
        find_resume_point(str(tmp_path))
    # Written before the markers existed: `latest` vouches for it, its rank files give the world size.
    legacy = tmp_path / "legacy"
    old = legacy / "checkpoints" / "step_00000003"
    old.mkdir(parents=True)
    for r in range(3):
        (old / f"trainer_state_rank{r}.pt").write_bytes(b"")
    (legacy / "checkpoints" / "latest").write_text("step_00000003")
    assert find_resume_point(str(legacy)).world_size == 3
    # A writer with run_state.pt leaves markers: a folder of it without them is incomplete, even when
    # `latest` names it (markers lost, a copy cut short), and the newest complete one is used.
    _checkpoint(legacy / "checkpoints", 2, [0, 1], 2)
    (old / "run_state.pt").write_bytes(b"")
    point = find_resume_point(str(legacy))
    assert point.tag == "step_00000002" and "step_00000003, which is incomplete" in point.note


def test_rotation_keeps_complete_checkpoints_and_drops_crashed_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for step, ranks in ((2, [0, 1]), (4, [0, 1]), (5, [0]), (6, [0, 1]), (8, [1])):
        _checkpoint(root, step, ranks, 2)
    rotate(str(root), keep=2, newest="step_00000006")
    assert step_dirs(str(root)) == ["step_00000004", "step_00000006", "step_00000008"]


def test_chat_and_stage2_find_a_checkpoint_past_a_dangling_latest(tmp_path):
    root = tmp_path / "checkpoints"
    folder = _checkpoint(root, 4, [0], 1)
    (root / "step_00000004" / "llama_proj.pth").write_bytes(b"")
    (root / "latest").write_text("step_00000009")
    assert find_checkpoint(str(tmp_path)) == folder
    # `latest` naming a folder whose ranks did not all finish (its projection may be cut short): the
    # newest complete one, as a resume takes; a folder named by the user is still taken as named.
    crashed = _checkpoint(root, 6, [], 1)
    (root / "step_00000006" / "llama_proj.pth").write_bytes(b"")
    (root / "step_00000006" / "run_state.pt").write_bytes(b"")
    (root / "latest").write_text("step_00000006")
    assert find_checkpoint(str(tmp_path)) == folder
    assert find_checkpoint(crashed) == crashed


def test_rank_state_loads_with_weights_only_and_restores_every_rng(tmp_path):
    import random

    import numpy as np

    from mgpt4.train.resume import rng_state, set_rng_state

    path = tmp_path / "trainer_state_rank0.pt"
    torch.save({"rng": rng_state(), "data": {"batches": 3}}, path)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws


def test_a_checkpoint_of_another_format_version_is_refused_with_what_to_do(tmp_path):
    from mgpt4.checkpoints import check_resume_point
    from mgpt4.train.run_state import read_checkpoint

    root = tmp_path / "checkpoints"
    folder = _checkpoint(root, 4, [0], 1)
    marker = pathlib.Path(folder, "done_rank0.json")
    assert json.loads(marker.read_text())["format_version"] == FORMAT_VERSION
    point = find_resume_point(str(tmp_path))
    check_resume_point(point, str(tmp_path), "tiny_stage1", 1, False)  # this version: taken
    marker.write_text(json.dumps({"rank": 0, "world_size": 1, "step": 4, "format_version": 0}))
    point = find_resume_point(str(tmp_path))
    with pytest.raises(ResumeError) as refused:  # before anything is built, from the markers alone
        check_resume_point(point, str(tmp_path), "tiny_stage1", 1, False)
    message = str(refused.value)
    assert (
        f"{folder} is a checkpoint of format version 0 and this mgpt4 reads format version {FORMAT_VERSION}"
        in message
    )
    assert f"--set model.weights.proj={folder}" in message and "--no-resume" in message
    # Written before markers existed: no version at all, refused the same way.
    legacy = tmp_path / "legacy" / "checkpoints" / "step_00000003"
    legacy.mkdir(parents=True)
    (legacy / "trainer_state_rank0.pt").write_bytes(b"")
    (legacy.parent / "latest").write_text("step_00000003")
    point = find_resume_point(str(tmp_path / "legacy"))
    with pytest.raises(ResumeError, match="is a checkpoint of no format version and this mgpt4 reads"):
        check_resume_point(point, str(tmp_path / "legacy"), "", 1, False)
    # The files carry the version too, and are checked again when read (a folder copied by hand).
    torch.save({"format_version": 0, "step": 4}, pathlib.Path(folder, "run_state.pt"))
    with pytest.raises(ResumeError, match=r"run_state\.pt: .* is a checkpoint of format version 0"):
        read_checkpoint(folder, None)
    torch.save({"format_version": FORMAT_VERSION, "step": 4}, pathlib.Path(folder, "run_state.pt"))
    torch.save(
        {"format_version": FORMAT_VERSION, "data": {}, "rng": {}},
        pathlib.Path(folder, "trainer_state_rank0.pt"),
    )
    assert read_checkpoint(folder, 0) == {"step": 4, "rank": {"data": {}, "rng": {}}}
    with pytest.raises(ResumeError, match=r"trainer_state_rank1\.pt is missing"):
        read_checkpoint(folder, 1)


def test_a_checkpoint_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    from mgpt4.train.run_state import read_checkpoint

    marker = tmp_path / "code-ran"
    torch.save({"format_version": FORMAT_VERSION, "rng": _RunsCode(str(marker))}, tmp_path / "run_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(str(tmp_path), None)
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ---------------------------------------------------------------------------------------------
# Item 7: `latest` missing or dangling, checkpoints none complete, --no-resume over an earlier run


@slow
@pytest.mark.parametrize("damage", ["missing", "dangling"])
def test_a_lost_latest_resumes_from_the_newest_complete_checkpoint(tmp_path, cache, damage):
    out = tmp_path / "run"
    common = ("train.steps=6", "train.save_every=2", "train.log_every=1")
    first = _train(cache, out, *common, "train.stop_at=4")
    assert first.returncode == 0, first.stdout[-3000:]
    root = out / "checkpoints"
    kept = _files(root / "step_00000002")
    if damage == "missing":
        (root / "latest").unlink()
        # A newer folder that a crash left half-written: skipped, it is not complete.
        _checkpoint(root, 5, [0], 2)
        note = "checkpoints/latest is missing; resuming from step_00000004"
    else:
        (root / "latest").write_text("step_00000008")
        note = "checkpoints/latest names step_00000008, which does not exist; resuming from step_00000004"
    second = _train(cache, out, *common)
    assert second.returncode == 0, second.stdout[-3000:]
    assert note in second.stdout and "resumed from step 4" in second.stdout
    # The run continued: no step was trained twice, nothing of the earlier checkpoints was overwritten.
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
    assert (root / "latest").read_text() == "step_00000006"
    assert _files(root / "step_00000002") == kept or not (root / "step_00000002").exists()  # rotated away


@slow
def test_checkpoints_none_of_which_is_complete_stop_the_run_and_nothing_is_written(tmp_path, cache):
    out = tmp_path / "run"
    _checkpoint(out / "checkpoints", 20, [0], 2)
    (out / "config.json").write_text('{"config": "the earlier run"}')
    before = _files(out)
    stdout = _fails_cleanly(_train(cache, out, "train.steps=2"))
    assert "none is complete (step_00000020: rank(s) 1 of 2 did not finish writing it)" in stdout
    assert "--no-resume" in stdout
    assert _files(out) == before


@slow
def test_no_resume_moves_the_earlier_run_aside(tmp_path, cache):
    out = tmp_path / "run"
    first = _train(cache, out, "train.steps=2")
    assert first.returncode == 0, first.stdout[-3000:]
    earlier = _files(out / "checkpoints")
    second = _train(cache, out, "train.steps=2", "train.seed=7", flags=("--no-resume",))
    assert second.returncode == 0, second.stdout[-3000:]
    (archived,) = list((out / "archive").iterdir())
    assert f"were moved to {archived}" in second.stdout
    assert _files(archived / "checkpoints") == earlier
    assert (archived / "config.json").is_file() and (archived / "metrics.jsonl").is_file()
    new = out / "checkpoints" / "step_00000002" / "llama_proj.pth"
    assert new.read_bytes() != earlier[os.path.join("step_00000002", "llama_proj.pth")]  # another seed
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [2]


# ---------------------------------------------------------------------------------------------
# Item 4: resume after the shard list changed


@slow
def test_a_changed_shard_list_stops_the_resume_until_a_fresh_pass_is_asked_for(tmp_path, cache, monkeypatch):
    from mgpt4.data.synthetic import ensure_synthetic

    monkeypatch.setenv("MGPT4_CACHE", cache)
    shards = ensure_synthetic().shards
    out = tmp_path / "run"
    common = ("train.steps=4", "train.save_every=2", "train.log_every=1")
    first = _train(cache, out, *common, f"data.sources.0.shards={json.dumps(shards[:3])}", "train.stop_at=2")
    assert first.returncode == 0, first.stdout[-3000:]
    checkpoint = _files(out / "checkpoints")

    appended = f"data.sources.0.shards={json.dumps(shards)}"
    stdout = _fails_cleanly(_train(cache, out, *common, appended))
    assert f"source 'synthetic': 1 shard(s) appended ({shards[3]})" in stdout
    assert "--set train.resume_data=fresh" in stdout
    assert _files(out / "checkpoints") == checkpoint

    fresh = _train(cache, out, *common, appended, "train.resume_data=fresh")
    assert fresh.returncode == 0, fresh.stdout[-3000:]
    assert (
        "resumed from step 2 (16 samples seen, written by 1 rank(s)) with a fresh data pass (1)"
        in fresh.stdout
    )
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2, 3, 4]
    state = torch.load(out / "checkpoints" / "step_00000004" / "trainer_state_rank0.pt", weights_only=True)
    assert (state["data"]["data_pass"], state["data"]["batches"]) == (1, 2)
    assert state["data"]["inputs"]["source 'synthetic'"] == shards


# ---------------------------------------------------------------------------------------------
# Item 8: stage 1 then stage 2, as the README shows it


def test_readme_stage2_command_starts_from_the_stage1_recipes_folder():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    stage1 = re.search(r"deepspeed [^\n]*launchers/pretrain\.py --recipe (stage1_\w+)", text).group(1)
    stage2 = re.search(r"deepspeed [^\n]*launchers/finetune\.py --recipe (stage2_\w+)[^\n]*", text)
    proj = re.search(r"--set model\.weights\.proj=(\S+)", stage2.group(0)).group(1)
    assert proj == get_recipe(stage1).train.output_dir
    assert get_recipe(stage2.group(1)).train.output_dir != proj
    outputs = [
        get_recipe(n).train.output_dir for n in ("tiny_stage1", "tiny_stage2", stage1, stage2.group(1))
    ]
    assert len(set(outputs)) == len(outputs)


@slow
def test_readme_two_stages_run_as_written(tmp_path, cache):
    for folder in ("launchers", "ds_configs"):
        shutil.copytree(os.path.join(REPO, folder), tmp_path / folder)
    commands = readme_block("two-stages")
    assert [c.split()[1] for c in commands] == ["launchers/pretrain.py", "launchers/finetune.py"]
    first = run(on_free_port(commands[0]), cache, cwd=str(tmp_path))
    assert first.returncode == 0, first.stdout[-3000:]
    stage1 = tmp_path / "outputs" / "tiny_stage1"
    stage1_files = _files(stage1 / "checkpoints")
    stage1_config = (stage1 / "config.json").read_bytes()
    second = run(on_free_port(commands[1]), cache, cwd=str(tmp_path))
    assert second.returncode == 0, second.stdout[-3000:]
    stage2 = tmp_path / "outputs" / "tiny_stage2"
    cfg = json.loads((stage2 / "config.json").read_text())["config"]
    assert cfg["recipe"] == "tiny_stage2"
    assert cfg["model"]["weights"]["proj"] == "outputs/tiny_stage1/checkpoints/step_00000040/llama_proj.pth"
    assert (stage2 / "checkpoints" / "latest").read_text() == "step_00000020"
    # Stage 2 in stage 1's own folder is refused before anything there is written.
    third = run(
        on_free_port(commands[1] + " --set train.output_dir=outputs/tiny_stage1"), cache, cwd=str(tmp_path)
    )
    stdout = _fails_cleanly(third)
    assert "holds checkpoints of recipe 'tiny_stage1'" in stdout
    assert "--set model.weights.proj=outputs/tiny_stage1" in stdout
    assert (stage1 / "config.json").read_bytes() == stage1_config
    assert _files(stage1 / "checkpoints") == stage1_files


# ---------------------------------------------------------------------------------------------
# Item 9: resume on another number of ranks


@slow
@pytest.mark.multirank
@pytest.mark.parametrize("ds_json,before,after", [("z2.json", 2, 1), ("z3.json", 1, 2)])
def test_resume_on_another_number_of_ranks(tmp_path, cache, ds_json, before, after):
    out = tmp_path / "run"
    common = ["--deepspeed", f"ds_configs/{ds_json}", "--set", f"train.output_dir={out}", "--set", "train.steps=6",
              "--set", "train.log_every=1", "--set", "train.save_every=3"]  # fmt: skip
    first = run(deepspeed_cmd("launchers/pretrain.py", before, *common, "--set", "train.stop_at=3"), cache)
    assert first.returncode == 0, first.stdout[-3000:]
    ckpt3 = out / "checkpoints" / "step_00000003"

    refused = run(deepspeed_cmd("launchers/pretrain.py", after, *common, "--set", "train.stop_at=4"), cache)
    stdout = _fails_cleanly(refused)
    assert f"written by {before} rank(s) and this run has {after}" in stdout
    assert "--set train.resume_data=fresh" in stdout

    # What the new number of ranks restored, before any step: the saved weights, both Adam moments, the
    # step count, the schedule, the engine's counters and the loss scale, exactly.
    fresh = ["--set", "train.resume_data=fresh", "--set", "train.stop_at=4"]
    probe = run(deepspeed_cmd("tests/restore_probe.py", after, "--probe-out", str(tmp_path / "restored.pt"),
                              *common, *fresh), cache)  # fmt: skip
    assert probe.returncode == 0, probe.stdout[-3000:]
    saved = torch.load(ckpt3 / "run_state.pt", weights_only=True)
    restored = torch.load(tmp_path / "restored.pt", weights_only=True)
    assert (saved["format_version"], saved["world_size"]) == (FORMAT_VERSION, before)
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert (
            set(restored["trainable"][key])
            == set(saved["trainable"][key])
            == {"llama_proj.weight", "llama_proj.bias"}
        )
        for name, tensor in saved["trainable"][key].items():
            assert torch.equal(restored["trainable"][key][name], tensor), (key, name)
    assert any(bool(t.abs().sum()) for t in saved["trainable"]["exp_avg_sq"].values())  # real moments
    for key in ("adam_step", "scheduler", "global_steps", "global_samples", "skipped_steps", "loss_scale"):
        assert restored["trainable"][key] == saved["trainable"][key], key
    assert (restored["step"], restored["samples_seen"]) == (saved["step"], saved["samples_seen"])
    assert torch.equal(restored["sample_images"], saved["sample_images"])

    second = run(
        deepspeed_cmd("launchers/pretrain.py", after, *common, "--set", "train.stop_at=4",
                      "--set", "train.resume_data=fresh"),
        cache,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"with a fresh data pass (1) for {after} rank(s)" in second.stdout
    s3 = torch.load(ckpt3 / "run_state.pt", weights_only=True)
    s4 = torch.load(out / "checkpoints" / "step_00000004" / "run_state.pt", weights_only=True)
    batch = get_recipe("tiny_stage1").data.batch_size
    assert (s3["step"], s3["trainable"]["adam_step"], s3["world_size"]) == (3, 3, before)
    assert (s4["step"], s4["trainable"]["adam_step"], s4["world_size"], s4["data_pass"]) == (4, 4, after, 1)
    assert s4["samples_seen"] == s3["samples_seen"] + batch * after == 3 * batch * before + batch * after
    # Step 4 is AdamW's update of the saved step-3 state: it holds only if the weights, both moments, the
    # step count (bias correction) and the schedule's lr were all carried over.
    o = get_recipe("tiny_stage1").optim
    b1, b2 = o.betas
    lr = lr_at(3, 6, o)
    t3, t4 = s3["trainable"], s4["trainable"]
    for name, w3 in t3["params"].items():
        m3, v3, m4, v4 = (
            t3["exp_avg"][name],
            t3["exp_avg_sq"][name],
            t4["exp_avg"][name],
            t4["exp_avg_sq"][name],
        )
        grad = (m4 - b1 * m3) / (1 - b1)
        torch.testing.assert_close(
            (v4 - b2 * v3) / (1 - b2), grad * grad, rtol=1e-3, atol=1e-3 * float(v4.max())
        )
        decay = o.weight_decay if w3.ndim >= 2 else 0.0
        denom = v4.sqrt() / math.sqrt(1 - b2**4) + o.eps
        expected = w3 * (1 - lr * decay) - lr / (1 - b1**4) * m4 / denom
        torch.testing.assert_close(t4["params"][name], expected, rtol=1e-5, atol=1e-7)
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train/lr"] == pytest.approx(lr_at(4, 6, o), rel=1e-6)
    # The data restarted: pass 1 of the stream, one batch into it, on each of the new ranks.
    for rank in range(after):
        data = torch.load(
            out / "checkpoints" / "step_00000004" / f"trainer_state_rank{rank}.pt", weights_only=True
        )["data"]
        assert (data["data_pass"], data["batches"], data["setup"]["world_size"]) == (1, 1, after)


# ---------------------------------------------------------------------------------------------
# Item 10: two runs on one machine


@slow
def test_two_single_process_runs_on_one_machine_at_once(tmp_path, cache):
    env = launcher_env(cache)
    env.pop("MASTER_PORT", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "launchers/pretrain.py",
                "--set",
                f"train.output_dir={tmp_path / str(i)}",
                "--set",
                "train.steps=3",
                "--set",
                "train.log_every=1",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert [r["step"] for r in read_jsonl(str(tmp_path / str(i) / "metrics.jsonl"))] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Item 12: per-part precision against the engine dtype


@slow
@pytest.mark.multirank
@pytest.mark.parametrize("ds_json", ["z2.json", "z3.json"])
def test_an_fp32_vision_path_under_a_bf16_engine(tmp_path, cache, ds_json):
    out = tmp_path / "run"
    zero3 = ds_json == "z3.json"
    sets = [
        "train.precision=bf16",
        "model.precision.vit=fp32",
        *(["model.precision.llm=bf16"] if zero3 else []),
    ]
    proc = run(
        deepspeed_cmd("launchers/pretrain.py", 2, "--deepspeed", f"ds_configs/{ds_json}",
                      "--set", f"train.output_dir={out}", "--set", "train.steps=2", "--set", "train.log_every=1",
                      *[a for kv in sets for a in ("--set", kv)]),
        cache,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    dtypes = json.loads((out / "engine.json").read_text())["dtypes"]
    assert dtypes == {
        "visual_encoder": "float32",  # as asked, although the engine is bf16
        "ln_vision": "float32",  # fp32 as in the official code
        "qformer": "float32",  # the tiny preset's
        "llama_proj": "bfloat16",  # the engine's: it trains in train.precision
        "llm": "bfloat16" if zero3 else "float32",  # ZeRO-3 needs the engine's dtype (checked at start)
    }
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in rows)


def test_precisions_the_engine_cannot_honour_are_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path))
    z3 = os.path.join(REPO, "ds_configs", "z3.json")
    with pytest.raises(
        SystemExit, match=r"model\.precision\.llm=fp32: under ZeRO-3 the LLM is created partitioned"
    ):
        main(["--dry-run", "--deepspeed", z3, "--set", "train.precision=bf16"])
    with pytest.raises(
        SystemExit, match=r"model\.precision\.proj=bf16: in training the projection keeps fp32"
    ):
        main(["--dry-run", "--set", "model.precision.proj=bf16"])
