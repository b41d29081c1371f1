"""SLURM clusters from tests/slurm_cluster.sh, and jobs submitted to them through slurm/*.sh."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.launch import REPO, launcher_env

CLUSTER_SCRIPT = os.path.join(REPO, "tests", "slurm_cluster.sh")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
# What mgpt4.dist.init prints once per rank of a training job.
RANK_LINE = re.compile(
    r"^.*?: rank (?P<rank>\d+)/(?P<world>\d+) local_rank (?P<local>\d+) node (?P<node>\S+) pid (?P<pid>\d+) "
    r"rendezvous (?P<addr>\S+):(?P<port>\d+) \((?P<launcher>\w+)\)$",
    re.M,
)


def require_slurm(nodes: int) -> None:
    """Skip, by name, where the cluster cannot run; under CI a missing piece fails instead."""
    tools = ["slurmctld", "slurmd", "sbatch", "munged", "unshare"]
    if nodes > 1:
        tools += ["ip", "nsenter"]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        reason = f"not installed: {', '.join(missing)} (tests/install.sh installs SLURM)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster needs root (munge, slurmd, namespaces)")


@dataclass
class Cluster:
    root: str

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "etc", "slurm.conf")

    def state(self) -> dict[str, list[str]]:
        """What `up` recorded in cluster.env (a key may repeat)."""
        out: dict[str, list[str]] = {}
        path = os.path.join(self.root, "cluster.env")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.strip().partition("=")
                    out.setdefault(key, []).append(value)
        return out

    @property
    def nodes(self) -> list[str]:
        return self.state().get("NODES", ["localhost"])[0].split(",")

    def down(self) -> None:
        subprocess.run(
            ["bash", CLUSTER_SCRIPT, "down"], env=dict(os.environ, SLURM_CI_ROOT=self.root), timeout=120
        )


@contextlib.contextmanager
def cluster(root: str, nodes: int) -> Iterator[Cluster]:
    """A running cluster of `nodes` nodes, torn down however the block ends (a failed `up` included)."""
    c = Cluster(root)
    try:
        subprocess.run(
            ["bash", CLUSTER_SCRIPT, "up", str(nodes)],
            env=dict(os.environ, SLURM_CI_ROOT=root), check=True, timeout=120,
        )  # fmt: skip
        yield c
    finally:
        c.down()


def job_env(c: Cluster, cache: str, **extra: str) -> dict[str, str]:
    env = launcher_env(cache)
    env.update(SLURM_CONF=c.conf, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    subnet = c.state().get("SUBNET")
    if subnet:
        # Open MPI's daemons and ranks talk over the test link only (see slurm/launch.sh).
        env.update(OMPI_MCA_oob_tcp_if_include=subnet[0], OMPI_MCA_btl_tcp_if_include=subnet[0])
    env.update(extra)
    return env


def submit(env: dict[str, str], tmp_path, *sbatch_args: str, script: str | None = "slurm/stage1.sh") -> str:
    """Submit from the repository root; `script=None` with a `--wrap=...` argument submits a command."""
    out = subprocess.run(
        ["sbatch", "--parsable", *sbatch_args, f"--output={tmp_path}/slurm-%j.out", *([script] if script else [])],
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
    """The job's final state; a job still running after `timeout` seconds is cancelled."""
    end = time.time() + timeout
    while time.time() < end:
        state = job_field(env, job, "JobState")
        if state in ENDED:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    return "WAIT_TIMEOUT"


def wait_for_text(path, text: str, timeout: float = 240) -> str:
    """The file's content once it holds `text` (or whatever it holds after `timeout` seconds)."""
    end = time.time() + timeout
    content = ""
    while time.time() < end:
        content = path.read_text() if path.is_file() else ""
        if text in content:
            break
        time.sleep(0.5)
    return content


def check_run(out, job: str, steps: int) -> str:
    """The job's log, after checking that the run reached `steps` and left its checkpoint."""
    log = (out / "logs" / f"job-{job}.log").read_text()
    assert f"step {steps}/{steps}" in log, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert (out / "checkpoints" / f"step_{steps:08d}" / "llama_proj.pth").is_file()
    assert (out / "config.json").is_file()  # the resolved config beside the logs
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    return log


def rank_lines(log: str) -> list[dict[str, str]]:
    return [m.groupdict() for m in RANK_LINE.finditer(log)]
