#!/bin/bash
# MiniGPT-4 stage 1 on SLURM, one task per GPU. Submit from the repository root:
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/stage1.sh
#   RECIPE=stage1_vicuna7b OVERRIDES="--set model.weights.llm=/models/vicuna-7b" sbatch ... slurm/stage1.sh
# Variables (RECIPE, DS_CONFIG, OUTPUT, OVERRIDES, LAUNCHER) are documented in slurm/launch.sh.
#SBATCH --job-name=mgpt4-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
# Three minutes before the time limit every task gets SIGUSR1: mgpt4 saves and requeues the job.
#SBATCH --signal=USR1@180
#SBATCH --requeue
export RECIPE="${RECIPE:-stage1_vicuna13b}"
exec bash slurm/launch.sh pretrain
