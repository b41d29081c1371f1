#!/bin/bash
# Shared body of slurm/stage1.sh and slurm/stage2.sh: start one training task per GPU.
#   $1: the launcher (pretrain or finetune). Everything else comes from the variables below.
#
#   RECIPE     recipe name (see mgpt4/recipes.py)
#   DS_CONFIG  DeepSpeed JSON (ZeRO settings only)        default ds_configs/z3.json
#   OUTPUT     run folder: checkpoints, tensorboard/, logs/, config.json
#              default runs/<job name>-<job id>; a requeued job keeps its id and so resumes here
#   OVERRIDES  extra arguments, e.g. "--set train.steps=100 --set model.weights.llm=/models/vicuna-13b"
#   LAUNCHER   srun (default: one task per GPU, ranks from SLURM_*) or mpirun (ranks from OMPI_*)
#
# Every rank prints `rank R/W local_rank L node HOST pid P rendezvous ADDR:PORT (launcher)` first.
# srun --kill-on-bad-exit=1 ends every task once one fails, and names it: "srun: error: HOST: task R".
# mpirun does the same by itself: "mpirun noticed that process rank R with PID P on node HOST exited".
#
# mpirun: inside the job, Open MPI starts its daemons on the other nodes through SLURM (srun), not ssh.
# Its daemons and ranks talk over TCP on any interface they find; on nodes with several networks
# (or where some are not routed between nodes) name the shared one, e.g.
#   export OMPI_MCA_oob_tcp_if_include=10.1.0.0/16 OMPI_MCA_btl_tcp_if_include=10.1.0.0/16
# before sbatch (which passes the environment on): oob is the daemons' control channel, btl the
# ranks' MPI traffic (only mgpt4's start-up). The two-node tests set both to their private link.
# Time-limit signal: SLURM signals job steps, and mpirun runs in the batch step, so only the ranks on
# the other nodes receive SIGUSR1 (enough: one rank stops all); a one-node mpirun job gets none.
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
