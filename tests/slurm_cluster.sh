#!/usr/bin/env bash
# A SLURM cluster on this machine for the tests (munge, slurmctld, one slurmd per node; run as root).
#   tests/slurm_cluster.sh up [NODES]   write the config under $SLURM_CI_ROOT and start the daemons
#   tests/slurm_cluster.sh down         stop and remove everything `up` made, whatever state it reached
#
# NODES=1 (the default): node `localhost` on 127.0.0.1.
# NODES=2: two hosts sharing the filesystem, as cluster nodes share storage. Each slurmd, and so each
#   task it starts, gets its own hostname (a UTS namespace) and its own /etc/hosts naming both nodes
#   (a mount namespace with a bind mount): a node name resolves to that node's address on either node.
#   Node 0 stays in the root network namespace; node 1 gets a network namespace joined to it by a veth
#   link on a private /30 that no interface or route here uses. Node 1 has no other interface and no
#   route, so its traffic can only reach node 0. slurmctld is reached at node 0's address.
# Every name (network namespace, link, node) carries a random instance id, so the clusters of test
# sessions running side by side never meet; slurmctld and slurmd ports are random too.
# $SLURM_CI_ROOT/cluster.env records what `up` made, as it makes it: `down` and the tests read it.
# The packages come from tests/install.sh. Later commands need SLURM_CONF=$SLURM_CI_ROOT/etc/slurm.conf.
set -euo pipefail
ROOT=${SLURM_CI_ROOT:?set SLURM_CI_ROOT to a folder for the cluster state}
export SLURM_CONF=$ROOT/etc/slurm.conf
STATE=$ROOT/cluster.env

record() { echo "$1=$2" >> "$STATE"; }
recorded() { if [ -f "$STATE" ]; then sed -n "s/^$1=//p" "$STATE"; fi; }

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

# True when no address or route of this host overlaps the /30 starting at $1.
subnet_free() {
  local base=$1 prefix=${1%.*} last=${1##*.} a
  [ -z "$(ip -4 route show match "$base/30" | grep -v '^default')" ] || return 1
  [ -z "$(ip -4 route show root "$base/30")" ] || return 1
  for a in $(ip -4 -o addr show | awk '{print $4}'); do
    a=${a%/*}
    if [ "${a%.*}" = "$prefix" ] && [ "${a##*.}" -ge "$last" ] && [ "${a##*.}" -le $((last + 3)) ]; then
      return 1
    fi
  done
}

# The veth link and node 1's network namespace, with a fresh id and a free subnet.
make_network() {
  local id base i
  for i in $(seq 1 50); do
    id=m4$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
    base=10.$((200 + RANDOM % 55)).$((RANDOM % 256)).$((RANDOM % 64 * 4))
    if ! ip netns list | grep -qw "mgpt4-$id" && ! ip link show "${id}n0" >/dev/null 2>&1 && subnet_free "$base"; then
      break
    fi
    if [ "$i" = 50 ]; then echo "no free instance id or /30 subnet found" >&2; return 1; fi
  done
  NETNS=mgpt4-$id
  NODE0=${id}n0
  NODE1=${id}n1
  ADDR0=${base%.*}.$((${base##*.} + 1))
  ADDR1=${base%.*}.$((${base##*.} + 2))
  record NODES "$NODE0,$NODE1"
  record SUBNET "$base/30"
  record NETNS "$NETNS"
  ip netns add "$NETNS"
  # The host end is named after node 0, the namespace end after node 1.
  record LINK "$NODE0"
  ip link add "$NODE0" type veth peer name "$NODE1" netns "$NETNS"
  ip addr add "$ADDR0/30" dev "$NODE0"
  ip link set "$NODE0" up
  ip -n "$NETNS" addr add "$ADDR1/30" dev "$NODE1"
  ip -n "$NETNS" link set "$NODE1" up
  ip -n "$NETNS" link set lo up
  printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$ADDR0" "$NODE0" "$ADDR1" "$NODE1" > "$ROOT/etc/hosts"
}

write_conf() {
  local cpus mem nodes
  cpus=$(nproc)
  mem=$(awk '/MemTotal/{printf "%d", $2/1024*0.9}' /proc/meminfo)
  if [ "$1" = 1 ]; then
    nodes="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    CTLD_ADDR=127.0.0.1
  else
    # Both nodes declare the whole machine: they share its cores and memory.
    nodes="NodeName=$NODE0 NodeAddr=$ADDR0 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=$NODE1 NodeAddr=$ADDR1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    CTLD_ADDR=$ADDR0
  fi
  cat > "$SLURM_CONF" <<CONF
ClusterName=mgpt4ci
SlurmctldHost=localhost($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
SlurmctldPort=$((6817 + RANDOM % 1000 * 2))
SlurmdPort=$((7818 + RANDOM % 1000 * 2))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# A requeued job becomes eligible after cred_expire; backfill then starts it within a second (default 30).
SchedulerParameters=bf_interval=1
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
# srun tasks derive their rendezvous port from the job id (mgpt4/dist.py): clusters started
# side by side on one machine must not all number their jobs from 1.
FirstJobId=$((1000 + RANDOM % 30000))
# Requeued jobs wait for the job credential to expire (default 120 s); short for the tests.
AuthInfo=cred_expire=5
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

# daemon_pid PIDFILE: the pid a daemon that just started writes there, recorded for `down`.
daemon_pid() {
  for _ in $(seq 1 50); do
    if [ -s "$1" ]; then break; fi
    sleep 0.1
  done
  record PID "$(cat "$1")"
  cat "$1"
}

# start_slurmd NAME [HOSTS [NETNS]]: slurmd in a mount namespace of its own, so that `down` finds
# every process of the node (slurmstepd, tasks) by that namespace. With HOSTS, the node also gets
# hostname NAME and that file as /etc/hosts; with NETNS, it runs in that network namespace.
start_slurmd() {
  local name=$1 hosts=${2:-} netns=${3:-} pid
  mkdir -p "$ROOT/spool/$name"
  if [ -z "$hosts" ]; then
    unshare --mount -- slurmd -N "$name"
  else
    # nsenter rather than `ip netns exec`, which mounts a fresh /sys without the cgroup tree slurmd reads.
    ${netns:+nsenter "--net=/run/netns/$netns"} unshare --uts --mount -- sh -c \
      'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -N "$1"' sh "$name" "$hosts"
  fi
  pid=$(daemon_pid "$ROOT/run/slurmd-$name.pid")
  record MNT_NS "$(readlink "/proc/$pid/ns/mnt")"
}

wait_idle() {
  for _ in $(seq 1 120); do
    [ "$(sinfo -h -N -o %T 2>/dev/null | sort -u)" = idle ] && return 0
    sleep 0.25
  done
  echo "the nodes never became idle" >&2
  sinfo -N -l >&2 || true
  tail -n 30 "$ROOT"/log/*.log >&2
  return 1
}

up() {
  local nodes=$1
  case "$nodes" in 1 | 2) ;; *) echo "NODES must be 1 or 2, got $nodes" >&2; return 2 ;; esac
  mkdir -p "$ROOT"/{etc,state,spool,log,run}
  : > "$STATE"
  start_munge
  [ "$nodes" = 1 ] || make_network
  write_conf "$nodes"
  slurmctld
  daemon_pid "$ROOT/run/slurmctld.pid" >/dev/null
  if [ "$nodes" = 1 ]; then
    start_slurmd localhost
  else
    start_slurmd "$NODE0" "$ROOT/etc/hosts"
    start_slurmd "$NODE1" "$ROOT/etc/hosts" "$NETNS"
  fi
  wait_idle
}

# stop_pid PID: end a daemon this cluster started (checked by name: a recorded pid may be reused).
stop_pid() {
  local p=$1
  case "$(cat "/proc/$p/comm" 2>/dev/null)" in slurmd | slurmctld) ;; *) return 0 ;; esac
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$p" 2>/dev/null || true
}

# The processes left on this cluster's nodes (slurmstepd, tasks): in a node's mount namespace and
# started under this SLURM_CONF. A namespace's number may be reused once it is gone; the
# environment tells this cluster's processes from another's.
node_pids() {
  local namespaces=$1 p ns
  for p in /proc/[0-9]*; do
    ns=$(readlink "$p/ns/mnt" 2>/dev/null) || continue
    if grep -qxF "$ns" <<< "$namespaces" \
      && tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"; then
      echo "${p#/proc/}"
    fi
  done
}

down() {
  local p ns
  for p in $(recorded PID) $(cat "$ROOT"/run/*.pid 2>/dev/null); do stop_pid "$p"; done
  # Job steps outlive a stopped slurmd: end what is left on the nodes.
  ns=$(recorded MNT_NS)
  if [ -n "$ns" ]; then
    for p in $(node_pids "$ns"); do kill -9 "$p" 2>/dev/null || true; done
  fi
  ns=$(recorded NETNS)
  if [ -n "$ns" ] && ip netns list | grep -qw "$ns"; then
    for p in $(ip netns pids "$ns"); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns"
  fi
  # Removing the namespace removes the link with it; this covers an `up` stopped in between.
  p=$(recorded LINK)
  if [ -n "$p" ] && ip link show "$p" >/dev/null 2>&1; then ip link del "$p"; fi
  return 0
}

case "${1:-}" in
  up)
    # A failed or interrupted `up` leaves nothing behind either.
    trap 'rc=$?; [ $rc = 0 ] || down; exit $rc' EXIT
    trap 'exit 130' INT TERM
    up "${2:-1}"
    ;;
  down) down ;;
  *) echo "usage: $0 up [1|2] | down" >&2; exit 2 ;;
esac
