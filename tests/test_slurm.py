"""`sbatch slurm/stage1.sh` on a real one-node SLURM: srun and mpirun rank wiring, preemption and requeue."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.launch import read_jsonl
from tests.slurm_jobs import (
    check_run,
    cluster,
    job_env,
    job_field,
    require_slurm,
    submit,
    wait,
    wait_for_text,
)

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; a machine without SLURM skips these tests by name (CI must have it)."""
    require_slurm(nodes=1)
    with cluster(str(tmp_path_factory.mktemp("slurm")), nodes=1) as c:
        yield c


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sbatch_stage1_on_two_tasks(slurm, tmp_path, tmp_path_factory, launcher):
    out = tmp_path / "run"
    env = job_env(
        slurm, str(tmp_path_factory.getbasetemp() / "cache"),
        RECIPE="tiny_stage1", DS_CONFIG="ds_configs/z2.json", OUTPUT=str(out), LAUNCHER=launcher,
        OVERRIDES="--set train.steps=6 --set train.log_every=2",
    )  # fmt: skip
    job = submit(env, tmp_path, "--ntasks=2", "--ntasks-per-node=2")
    state = wait(env, job)
    slurm_out = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", slurm_out[-4000:]
    log = check_run(out, job, 6)
    assert '"world_size": 2' in log  # two ranks joined one process group
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [2, 4, 6]


def test_preemption_saves_requeues_and_resumes(slurm, tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    env = job_env(
        slurm, str(tmp_path_factory.getbasetemp() / "cache"),
        RECIPE="tiny_stage1", DS_CONFIG="ds_configs/z2.json", OUTPUT=str(out),
        OVERRIDES="--set train.steps=150 --set train.log_every=5 --set train.save_every=1000",
    )  # fmt: skip
    job = submit(env, tmp_path, "--ntasks=2", "--ntasks-per-node=2")
    log_file = out / "logs" / f"job-{job}.log"
    assert "step 10/" in wait_for_text(log_file, "step 10/"), (tmp_path / f"slurm-{job}.out").read_text()
    # What SLURM sends `--signal=USR1@180` ahead of the time limit, sent now.
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    assert wait(env, job) == "COMPLETED"
    assert job_field(env, job, "Restarts") == "1"
    log = check_run(out, job, 150)
    saved = re.search(r"preempted at step (\d+): requeueing job \d+", log)
    assert saved, log[-3000:]
    assert f"resumed from step {saved.group(1)}" in log
    assert 10 <= int(saved.group(1)) < 150
