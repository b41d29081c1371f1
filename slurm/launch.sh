#!/bin/bash
# Shared body of slurm/stage1.sh and slurm/stage2.sh: start one training task per GPU.
#   $1: the launcher (pretrain or finetune). Everything else comes from the variables below.
#
#   RECIPE     recipe name (see mgpt4/recipes.py)
#   DS_CONFIG  DeepSpeed JSON (ZeRO settings only)        default ds_configs/z3.json
#   OUTPUT     run folder: checkpoints, tensorboard/, logs/, config.json
#              default runs/<job name>-<job id>; a requeued job keeps its id and so resumes here
#   OVERRIDES  extra arguments, e.g. "--set train.steps=100 --set model.weights.llm=/models/vicuna-13b"
#   LAUNCHER   srun (default: one task per GPU, ranks from SLURM_*) or mpirun (ranks via mpi4py)
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
OUTPUT="${OUTPUT:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
mkdir -p "$OUTPUT/logs"
args=(launchers/"$1".py --recipe "$RECIPE" --deepspeed "${DS_CONFIG:-ds_configs/z3.json}" --set "train.output_dir=$OUTPUT")
# shellcheck disable=SC2206  # OVERRIDES is a list of words by design
args+=(${OVERRIDES:-})
echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${args[*]}"
case "${LAUNCHER:-srun}" in
  srun) srun --kill-on-bad-exit=1 python -u "${args[@]}" ;;
  mpirun) mpirun -np "$SLURM_NTASKS" python -u "${args[@]}" ;;
  *) echo "LAUNCHER must be srun or mpirun, got ${LAUNCHER}" >&2; exit 2 ;;
esac 2>&1 | tee -a "$OUTPUT/logs/job-${SLURM_JOB_ID}.log"
