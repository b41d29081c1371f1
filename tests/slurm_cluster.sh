#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for the tests (munge, slurmctld, slurmd; run as root).
#   tests/slurm_cluster.sh up     write the config under $SLURM_CI_ROOT and start the daemons
#   tests/slurm_cluster.sh down   stop them
# The packages come from tests/install.sh. Later commands need SLURM_CONF=$SLURM_CI_ROOT/etc/slurm.conf.
set -euo pipefail
ROOT=${SLURM_CI_ROOT:?set SLURM_CI_ROOT to a folder for the cluster state}
export SLURM_CONF=$ROOT/etc/slurm.conf

start_munge() {
  if [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then return; fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null
}

write_conf() {
  mkdir -p "$ROOT"/{etc,state,spool,log,run}
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/{printf "%d", $2/1024*0.9}' /proc/meminfo)
  cat > "$SLURM_CONF" <<CONF
ClusterName=mgpt4ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldPort=$((6817 + RANDOM % 1000 * 2))
SlurmdPort=$((7818 + RANDOM % 1000 * 2))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
JobRequeue=1
# srun tasks derive their rendezvous port from the job id (mgpt4/train/launch_env.py): clusters started
# side by side on one machine must not all number their jobs from 1.
FirstJobId=$((1000 + RANDOM % 30000))
# Requeued jobs wait for the job credential to expire (default 120 s); short for the tests.
AuthInfo=cred_expire=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

start_slurm() {
  slurmctld
  slurmd -N localhost
  for _ in $(seq 1 120); do
    [ "$(sinfo -h -N -o %T 2>/dev/null)" = idle ] && return 0
    sleep 0.25
  done
  echo "node never became idle" >&2
  sinfo -N -l >&2 || true
  tail -n 30 "$ROOT"/log/*.log >&2
  return 1
}

stop_all() {
  local f p
  for f in "$ROOT/run/slurmd.pid" "$ROOT/run/slurmctld.pid"; do
    [ -s "$f" ] || continue
    p=$(cat "$f")
    kill "$p" 2>/dev/null || continue
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p"
  done
  return 0
}

case "${1:-}" in
  up) start_munge; write_conf; start_slurm ;;
  down) stop_all ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
