"""Extraction over several ranks, started by the deepspeed launcher and by srun: each rank writes its share
of the shards, and together they write exactly what one rank writes alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.launch import REPO, deepspeed_cmd, launcher_env, run
from tests.test_slurm_curate import slurm  # noqa: F401 (the one-node SLURM fixture)

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mgpt4-cache"))


@pytest.fixture(scope="module")
def one_rank(cache, tmp_path_factory):
    """The tiny recipe's four synthetic shards extracted by a single process: the reference."""
    out = str(tmp_path_factory.mktemp("one-rank"))
    proc = run([sys.executable, "-m", "mgpt4.features", "extract", "--out", out, "--num-workers", "1"], cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return os.path.join(out, "synthetic")


def _same_shards(folder: str, reference: str) -> None:
    names = sorted(f for f in os.listdir(reference) if f.endswith(".tar"))
    assert names == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    for name in names:
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(folder, "features.json")) as f:
        manifest = json.load(f)
    assert manifest["samples"] == 128 and manifest["shards_done"] == 4


def test_two_ranks_through_the_deepspeed_launcher(cache, one_rank, tmp_path):
    out = tmp_path / "feat"
    # deepspeed --num_gpus 2 --master_port P --module mgpt4.features extract ...
    cmd = deepspeed_cmd("--module", 2, "mgpt4.features", "extract", "--out", str(out), "--num-workers", "1")
    proc = run(cmd, cache)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "4 written now on 2 rank(s): 128 samples, 0 skipped" in proc.stdout
    _same_shards(str(out / "synthetic"), one_rank)


def test_two_ranks_under_srun(slurm, cache, one_rank, tmp_path):  # noqa: F811
    out = tmp_path / "feat"
    env = launcher_env(cache)
    env.update(SLURM_CONF=slurm.conf, PYTHONPATH=REPO)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = ["srun", "--ntasks=2", "--kill-on-bad-exit=1", sys.executable, "-m", "mgpt4.features", "extract",
           "--out", str(out), "--num-workers", "1"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "4 written now on 2 rank(s)" in log  # two ranks joined, not two worlds of one
    _same_shards(str(out / "synthetic"), one_rank)
