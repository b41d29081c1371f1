"""The one process wiring (mgpt4/dist.py): each launcher's variables (deepspeed, torchrun, srun, mpirun
with Open MPI or another MPI, plain python) detected and turned into the torch variables, the rank
logging tags lines with, and the step timeout reaching the process groups DeepSpeed makes."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as tdist

from mgpt4 import dist
from mgpt4.dist import detect, first_node, free_port, process_rank, wire

TORCH = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}


def test_launcher_variables_are_kept():
    env = {**TORCH, "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}
    assert wire(env) == "launcher" and env["RANK"] == "3"
    assert process_rank(env) == (3, 8)  # logging reads the same variables, without writing any


@pytest.mark.parametrize(
    "extra,name",
    [({"CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "4"}, "deepspeed"),
     ({"TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "1"}, "torchrun")],
)  # fmt: skip
def test_deepspeed_and_torchrun_are_named(extra, name):
    env = {**TORCH, **extra}
    launcher, info = detect(env)
    assert launcher == name and env == {**TORCH, **extra}  # nothing added
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (
        3,
        8,
        3,
        "n1",
        1234,
    )


def test_srun_maps_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node"}  # fmt: skip
    assert process_rank(env) == (5, 8)
    assert wire(env) == "srun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu-node" and env["MASTER_PORT"] == str(20000 + 4242)


def test_mpirun_wins_over_slurm():
    # Inside an sbatch job every mpirun rank sees SLURM_PROCID=0: Open MPI's variables must win.
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[1-2]"}  # fmt: skip
    assert process_rank(env) == (3, 4)  # logging tags rank 3's lines as rank 3, not SLURM's 0
    assert wire(env, rank0_endpoint=lambda port: ("gpu1", port)) == "mpirun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    # Rank 0's hostname (not the first address of its `hostname -I`) and the job's port, as under srun.
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu1", str(20000 + 4242))


def test_mpirun_outside_slurm_takes_a_port_rank_0_found_free():
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    asked = []
    assert wire(env, rank0_endpoint=lambda port: asked.append(port) or ("head", "41234")) == "mpirun"
    assert asked == [None]  # no job port to derive: rank 0 picks one
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "41234")


def test_other_mpis_use_their_pmi_variables():
    env = {"PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALRANKID": "1", "MASTER_PORT": "5555"}
    assert process_rank(env) == (1, 2)
    assert wire(env, rank0_endpoint=lambda port: ("head", port)) == "mpirun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "5555")


def test_a_single_process_takes_a_free_port():
    """Two runs started without a launcher on one machine must not both take 29500."""
    first, second = {}, {}
    assert process_rank(first) == (0, 1) and first == {}
    assert wire(first) == "single" and wire(second) == "single"
    assert first["WORLD_SIZE"] == "1" and int(first["MASTER_PORT"]) > 0
    assert wire({"MASTER_PORT": "6000"}) == "single"  # a port the user sets is kept


def test_batch_step_without_srun_is_a_single_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}  # the batch script itself
    assert process_rank(env) == (0, 1)
    assert wire(env) == "single" and env["WORLD_SIZE"] == "1"


def test_first_node_of_a_compressed_list():
    assert first_node("gpu[03-05,07],cpu1") == "gpu03"
    assert first_node("node7") == "node7"


def test_launcher_variables_that_do_not_fit_are_named():
    with pytest.raises(SystemExit, match="RANK / WORLD_SIZE"):
        detect({**TORCH, "RANK": "x"})
    with pytest.raises(SystemExit, match="RANK=8 is not within WORLD_SIZE=8"):
        detect({**TORCH, "RANK": "8"})
    assert process_rank({**TORCH, "RANK": "x"}) == (0, 1)  # logging goes on; the launch stops


def _seconds(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def test_the_step_timeout_reaches_adopted_groups_and_names_the_others(monkeypatch, caplog):
    """A world of one in this process: a group made elsewhere (as DeepSpeed makes its own) gets the
    start-up timeout once adopted and the step timeout with the world group; one never adopted is
    named, and keeps the timeout it was made with. (Two ranks under DeepSpeed: tests/test_house.py.)"""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for var, value in {**env, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(var, value)
    d = dist.init(45, device_type="cpu")
    try:
        assert (d.rank, d.world_size, d.device) == (0, 1, torch.device("cpu"))
        assert process_rank() == (0, 1) and [_seconds(g) for g in dist.groups()] == [2700.0]
        made = tdist.new_group([0])
        assert _seconds(made) == 1800.0  # torch's default, not the start-up timeout
        dist.adopt(made, None)
        assert [_seconds(g) for g in dist.groups()] == [2700.0, 2700.0]
        with caplog.at_level(logging.WARNING, logger="mgpt4.dist"):
            dist.set_timeout(0.5)
        assert [_seconds(g) for g in dist.groups()] == [30.0, 30.0]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        stray = tdist.new_group([0])
        with caplog.at_level(logging.WARNING, logger="mgpt4.dist"):
            dist.set_timeout(1)
        assert "1 process group(s) made outside mgpt4.dist" in caplog.text
        assert [_seconds(g) for g in dist.groups()] == [60.0, 60.0] and _seconds(stray) == 1800.0
    finally:
        dist.shutdown()
    assert not tdist.is_initialized() and dist.groups() == []
