"""Curation's describe step started by `srun` on the localhost SLURM: ranks wired as training wires them,
with no RANK / WORLD_SIZE / MASTER_* set by hand."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mgpt4.curate.store import read_store
from tests.curate_fixtures import draw_images, make_stage1_checkpoint
from tests.launch import REPO, launcher_env

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; a machine without SLURM skips by name (CI must have it)."""
    if shutil.which("slurmctld") is None or shutil.which("srun") is None:
        reason = "SLURM is not installed (slurmctld/srun not found); tests/install.sh installs it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the localhost SLURM cluster needs root (munge and slurmd run as root)")
    root = str(tmp_path_factory.mktemp("slurm-curate"))
    env = dict(os.environ, SLURM_CI_ROOT=root)
    subprocess.run(["bash", "tests/slurm_cluster.sh", "up"], cwd=REPO, env=env, check=True, timeout=120)
    yield os.path.join(root, "etc", "slurm.conf")
    subprocess.run(["bash", "tests/slurm_cluster.sh", "down"], cwd=REPO, env=env, timeout=120)


def test_srun_describe_shares_the_images_over_two_ranks(slurm, tmp_path, tokenizer):
    from mgpt4.model.presets import tiny

    stage1 = make_stage1_checkpoint(str(tmp_path / "stage1"), tiny(), tokenizer)
    images = tmp_path / "images"
    draw_images(str(images), 6)
    out = tmp_path / "desc"
    env = launcher_env(str(tmp_path / "cache"))
    env.update(SLURM_CONF=slurm, PYTHONPATH=REPO)
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
