"""Rank wiring for deepspeed/torchrun, srun, mpirun and plain python."""

from __future__ import annotations

from mgpt4.launch_env import first_node, wire


def test_launcher_variables_are_kept():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}  # fmt: skip
    assert wire(env) == "launcher" and env["RANK"] == "3"


def test_srun_maps_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node"}  # fmt: skip
    assert wire(env) == "srun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu-node" and env["MASTER_PORT"] == str(20000 + 4242)


def test_mpirun_wins_over_slurm():
    # Inside an sbatch job every mpirun rank sees SLURM_PROCID=0: Open MPI's variables must win.
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[1-2]"}  # fmt: skip
    assert wire(env, rank0_host=lambda: "gpu1") == "mpirun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    # Rank 0's hostname (not the first address of its `hostname -I`) and the job's port, as under srun.
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu1", str(20000 + 4242))


def test_mpirun_outside_slurm_uses_the_usual_port():
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert wire(env, rank0_host=lambda: "head") == "mpirun"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "29500")


def test_other_mpis_are_left_to_deepspeed():
    env = {"PMI_SIZE": "2", "PMI_RANK": "1"}
    assert wire(env) == "mpirun" and "RANK" not in env  # DeepSpeed's mpi4py discovery


def test_batch_step_without_srun_is_a_single_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}  # the batch script itself
    assert wire(env) == "single" and env["WORLD_SIZE"] == "1"


def test_first_node_of_a_compressed_list():
    assert first_node("gpu[03-05,07],cpu1") == "gpu03"
    assert first_node("node7") == "node7"
