#!/bin/bash
# MiniGPT-4 stage 2 on SLURM, one task per GPU. Submit from the repository root:
#   OVERRIDES="--set model.weights.proj=runs/mgpt4-stage1-1234" sbatch --gpus-per-node=1 slurm/stage2.sh
# Variables (RECIPE, DS_CONFIG, OUTPUT, OVERRIDES, LAUNCHER) are documented in slurm/launch.sh.
#SBATCH --job-name=mgpt4-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@180
#SBATCH --requeue
export RECIPE="${RECIPE:-stage2_vicuna13b}"
exec bash slurm/launch.sh finetune
