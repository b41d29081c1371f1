"""`sbatch slurm/stage1.sh` on a real one-node SLURM: srun and mpirun rank wiring, preemption and requeue."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.launch import REPO, launcher_env, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running cluster; a machine without SLURM skips these tests by name (CI must have it)."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        reason = "SLURM is not installed (slurmctld/sbatch not found); tests/install.sh installs it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the localhost SLURM cluster needs root (munge and slurmd run as root)")
    root = str(tmp_path_factory.mktemp("slurm"))
    env = dict(os.environ, SLURM_CI_ROOT=root)
    subprocess.run(["bash", "tests/slurm_cluster.sh", "up"], cwd=REPO, env=env, check=True, timeout=120)
    yield os.path.join(root, "etc", "slurm.conf")
    subprocess.run(["bash", "tests/slurm_cluster.sh", "down"], cwd=REPO, env=env, timeout=120)


def job_env(slurm_conf: str, cache: str, **extra: str) -> dict[str, str]:
    env = launcher_env(cache)
    env.update(SLURM_CONF=slurm_conf, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    return env


def submit(env: dict[str, str], tmp_path, script: str = "slurm/stage1.sh") -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "--ntasks-per-node=2", f"--output={tmp_path}/slurm-%j.out", script],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip().split(";")[0]


def job_field(env: dict[str, str], job: str, name: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True
    ).stdout
    m = re.search(rf"\b{name}=(\S*)", out)
    return m.group(1) if m else ""


def wait(env: dict[str, str], job: str, timeout: float = 300) -> str:
    end = time.time() + timeout
    while time.time() < end:
        state = job_field(env, job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    return "WAIT_TIMEOUT"


def _check_run(out, job: str, steps: int) -> str:
    log = (out / "logs" / f"job-{job}.log").read_text()
    assert f"step {steps}/{steps}" in log, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert (out / "checkpoints" / f"step_{steps:08d}" / "llama_proj.pth").is_file()
    assert (out / "config.json").is_file()  # the resolved config beside the logs
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    return log


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sbatch_stage1_on_two_tasks(slurm, tmp_path, tmp_path_factory, launcher):
    out = tmp_path / "run"
    env = job_env(
        slurm, str(tmp_path_factory.getbasetemp() / "cache"),
        RECIPE="tiny_stage1", DS_CONFIG="ds_configs/z2.json", OUTPUT=str(out), LAUNCHER=launcher,
        OVERRIDES="--set train.steps=6 --set train.log_every=2",
    )  # fmt: skip
    job = submit(env, tmp_path)
    state = wait(env, job)
    slurm_out = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", slurm_out[-4000:]
    log = _check_run(out, job, 6)
    assert '"world_size": 2' in log  # two ranks joined one process group
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [2, 4, 6]


def test_preemption_saves_requeues_and_resumes(slurm, tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    env = job_env(
        slurm, str(tmp_path_factory.getbasetemp() / "cache"),
        RECIPE="tiny_stage1", DS_CONFIG="ds_configs/z2.json", OUTPUT=str(out),
        OVERRIDES="--set train.steps=150 --set train.log_every=5 --set train.save_every=1000",
    )  # fmt: skip
    job = submit(env, tmp_path)
    log_file = out / "logs" / f"job-{job}.log"
    end = time.time() + 240
    while time.time() < end and not (log_file.is_file() and "step 10/" in log_file.read_text()):
        time.sleep(0.5)
    assert log_file.is_file() and "step 10/" in log_file.read_text(), (
        tmp_path / f"slurm-{job}.out"
    ).read_text()
    # What SLURM sends `--signal=USR1@180` ahead of the time limit, sent now.
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    assert wait(env, job) == "COMPLETED"
    assert job_field(env, job, "Restarts") == "1"
    log = _check_run(out, job, 150)
    saved = re.search(r"preempted at step (\d+): requeueing job \d+", log)
    assert saved, log[-3000:]
    assert f"resumed from step {saved.group(1)}" in log
    assert 10 <= int(saved.group(1)) < 150
