"""`sbatch --nodes=2 slurm/stage1.sh` on a real two-node SLURM on this machine (tests/slurm_cluster.sh).

Node 1 is a host of its own: its own network namespace, address, hostname and /etc/hosts. So these
tests see what only several nodes show: the rendezvous address, global against local rank, a signal
and a failure on the other node, and a cluster that leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time

import pytest

from tests.launch import read_jsonl
from tests.slurm_jobs import (
    CLUSTER_SCRIPT,
    Cluster,
    check_run,
    cluster,
    job_env,
    job_field,
    rank_lines,
    require_slurm,
    submit,
    wait,
    wait_for_text,
)

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

TWO_BY_TWO = ("--nodes=2", "--ntasks-per-node=2")


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    require_slurm(nodes=2)
    with cluster(str(tmp_path_factory.mktemp("slurm2")), nodes=2) as c:
        yield c


def tiny_env(c: Cluster, tmp_path, tmp_path_factory, overrides: str, **extra: str) -> dict[str, str]:
    return job_env(
        c, str(tmp_path_factory.getbasetemp() / "cache"),
        RECIPE="tiny_stage1", DS_CONFIG="ds_configs/z2.json", OUTPUT=str(tmp_path / "run"),
        OVERRIDES=overrides, **extra,
    )  # fmt: skip


def check_ranks(log: str, nodes: list[str], job: str, launcher: str) -> list[dict[str, str]]:
    """Four ranks, two per node in order, all meeting at rank 0's node on the job's port."""
    ranks = sorted(rank_lines(log), key=lambda r: int(r["rank"]))
    assert [int(r["rank"]) for r in ranks] == [0, 1, 2, 3], log[-3000:]
    for r in ranks:
        g = int(r["rank"])
        assert (r["world"], int(r["local"]), r["node"]) == ("4", g % 2, nodes[g // 2]), r
        assert (r["addr"], r["port"], r["launcher"]) == (nodes[0], str(20000 + int(job) % 20000), launcher), r
    return ranks


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_four_ranks_on_two_nodes(slurm2, tmp_path, tmp_path_factory, launcher):
    env = tiny_env(
        slurm2, tmp_path, tmp_path_factory, "--set train.steps=6 --set train.log_every=2", LAUNCHER=launcher
    )
    job = submit(env, tmp_path, *TWO_BY_TWO)
    state = wait(env, job, timeout=240)
    assert state == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()[-4000:]
    log = check_run(tmp_path / "run", job, 6)
    check_ranks(log, slurm2.nodes, job, launcher)
    assert '"world_size": 4' in log  # one process group over both nodes
    assert [r["step"] for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))] == [2, 4, 6]


def test_preemption_on_two_nodes(slurm2, tmp_path, tmp_path_factory):
    env = tiny_env(
        slurm2, tmp_path, tmp_path_factory,
        "--set train.steps=60 --set train.log_every=5 --set train.save_every=1000",
    )  # fmt: skip
    job = submit(env, tmp_path, *TWO_BY_TWO)
    log_file = tmp_path / "run" / "logs" / f"job-{job}.log"
    assert "step 10/" in wait_for_text(log_file, "step 10/"), (tmp_path / f"slurm-{job}.out").read_text()
    # What SLURM sends every task of the job ahead of the time limit (`--signal=USR1@180`), sent now.
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    assert wait(env, job, timeout=240) == "COMPLETED", log_file.read_text()[-4000:]
    assert job_field(env, job, "Restarts") == "1"
    log = check_run(tmp_path / "run", job, 60)
    nodes = slurm2.nodes
    for g in range(4):  # the signal reached every task on both nodes
        assert f"rank {g} on node {nodes[g // 2]}: SIGUSR1 received" in log, log[-4000:]
    saved = re.search(r"preempted at step (\d+): requeueing job \d+", log)
    assert saved, log[-4000:]
    step = int(saved.group(1))
    assert 10 <= step < 60
    # Every rank wrote its part of that one checkpoint, and the requeued job resumed from it.
    folder = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
    for g in range(4):
        assert (folder / f"trainer_state_rank{g}.pt").is_file()
        assert json.loads((folder / f"done_rank{g}.json").read_text())["world_size"] == 4
    assert (folder / "run_state.pt").is_file()
    assert f"resumed from step {step}" in log
    # The requeued job came back with the same wiring over both nodes.
    first, second = log.split(saved.group(0))
    check_ranks(first, nodes, job, "srun")
    check_ranks(second, nodes, job, "srun")


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_dead_rank_ends_the_job(slurm2, tmp_path, tmp_path_factory, launcher):
    # Far longer than the wait below may last: the job must be ended by the launcher noticing the
    # dead rank, never by the survivors' collectives running out of time.
    timeout_min = 30
    env = tiny_env(
        slurm2, tmp_path, tmp_path_factory,
        f"--set train.steps=100000 --set train.log_every=5 --set train.comm_timeout_min={timeout_min}",
        LAUNCHER=launcher,
    )  # fmt: skip
    job = submit(env, tmp_path, *TWO_BY_TWO)
    log_file = tmp_path / "run" / "logs" / f"job-{job}.log"
    log = wait_for_text(log_file, "step 10/")
    assert "step 10/" in log, (tmp_path / f"slurm-{job}.out").read_text()
    ranks = check_ranks(log, slurm2.nodes, job, launcher)
    dead, node = ranks[3]["pid"], slurm2.nodes[1]
    os.kill(int(dead), 9)  # rank 3, on node 1, in the middle of training
    state = wait(env, job, timeout=240)  # a guard against a hang; what ended the job is checked below
    log = log_file.read_text()
    assert state == "FAILED", log[-4000:]
    assert "Timed out" not in log and "timed out" not in log, log[-4000:]  # no collective ran out of time
    # The launcher names the dead rank and its node; the rank lines tie that rank to its process.
    named = {
        "srun": f"srun: error: {node}: task 3: Killed",
        "mpirun": f"process rank 3 with PID {dead} on node {node} exited on signal 9",
    }[launcher]
    assert named in log, log[-4000:]
    # No rank is left behind on either node (SLURM ends what remains of a job within KillWait, 5 s here).
    end = time.time() + 15
    while (left := [r for r in ranks if running(int(r["pid"]))]) and time.time() < end:
        time.sleep(0.5)
    assert not left, f"still running after the job ended: {left}"


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _leftovers(c: Cluster) -> list[str]:
    """What of a cluster instance still exists: its network namespace, link, daemons, node processes."""
    state, left = c.state(), []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    left += [f"namespace {ns}" for ns in state.get("NETNS", []) if ns in netns]
    for link in state.get("LINK", []):
        if subprocess.run(["ip", "link", "show", link], capture_output=True).returncode == 0:
            left.append(f"link {link}")
    for pid in state.get("PID", []):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            if f.read().strip() in ("slurmd", "slurmctld"):
                left.append(f"daemon pid {pid}")
    # A node's processes: in its mount namespace and under this cluster's SLURM_CONF (as `down` finds them).
    mnt, conf = set(state.get("MNT_NS", [])), f"SLURM_CONF={c.conf}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if os.readlink(f"/proc/{pid}/ns/mnt") in mnt and conf in f.read().split(b"\0"):
                    left.append(f"node process {pid}")
        except OSError:
            pass  # ended meanwhile
    return left


def test_cluster_down_leaves_nothing(tmp_path):
    require_slurm(nodes=2)
    c = Cluster(str(tmp_path / "c"))
    with cluster(c.root, nodes=2):
        env = job_env(c, str(tmp_path / "cache"))
        job = submit(env, tmp_path, *TWO_BY_TWO, "--wrap=srun sleep 600", script=None)
        end = time.time() + 60
        while job_field(env, job, "JobState") != "RUNNING" and time.time() < end:
            time.sleep(0.5)
        time.sleep(1)  # the steps' tasks start
        state = c.state()
        assert len(state["MNT_NS"]) == 2 and state["NETNS"] and state["LINK"] and len(state["PID"]) == 3
        assert any(x.startswith("node process") for x in _leftovers(c)), "no job ran on the nodes"
        # `down` runs without the job being cancelled first, as after a test that failed mid-job.
    assert _leftovers(c) == []


def test_failed_up_leaves_nothing(tmp_path):
    """`up` that fails half way (here slurmd cannot start) takes down what it had made."""
    require_slurm(nodes=2)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "slurmd").write_text("#!/bin/sh\necho 'slurmd: failing on purpose' >&2\nexit 1\n")
    (fake / "slurmd").chmod(0o755)
    root = tmp_path / "c"
    env = dict(os.environ, SLURM_CI_ROOT=str(root), PATH=f"{fake}:{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", CLUSTER_SCRIPT, "up", "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "failing on purpose" in proc.stderr
    c = Cluster(str(root))
    assert c.state()["NETNS"] and c.state()["LINK"], c.state()  # it got as far as the network
    assert _leftovers(c) == []
