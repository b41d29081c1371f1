"""Curation's describe step started by `srun` on the localhost SLURM: ranks wired as training wires them,
with no RANK / WORLD_SIZE / MASTER_* set by hand."""

from __future__ import annotations

import os
import subprocess

import pytest

from mgpt4.curate.store import read_store
from tests.curate_fixtures import draw_images, make_stage1_checkpoint
from tests.launch import REPO, launcher_env
from tests.slurm_jobs import cluster, require_slurm

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; a machine without SLURM skips by name (CI must have it)."""
    require_slurm(nodes=1)
    with cluster(str(tmp_path_factory.mktemp("slurm-curate")), nodes=1) as c:
        yield c


def test_srun_describe_shares_the_images_over_two_ranks(slurm, tmp_path, tokenizer):
    from mgpt4.model.presets import tiny

    stage1 = make_stage1_checkpoint(str(tmp_path / "stage1"), tiny(), tokenizer)
    images = tmp_path / "images"
    draw_images(str(images), 6)
    out = tmp_path / "desc"
    env = launcher_env(str(tmp_path / "cache"))
    env.update(SLURM_CONF=slurm.conf, PYTHONPATH=REPO)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = ["srun", "--ntasks=2", "--kill-on-bad-exit=1", "python", "-m", "mgpt4.curate", "describe",
           "--images", str(images), "--out", str(out), "--checkpoint", stage1, "--device", "cpu",
           "--max-new-tokens", "4", "--batch-size", "2", "--num-workers", "0", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    parts = sorted(p for p in os.listdir(out) if p.startswith("part-"))
    assert len(parts) == 2, parts  # one store part per rank: two ranks joined, not two worlds of one
    assert len(read_store(str(out)).records) == 6
    assert "describe rank 0/2" in log and "describe rank 1/2" in log
    assert "describe: 6 done, 0 failed of 6 pending on 2 ranks" in log
