#!/usr/bin/env bash
# A real single-node Slurm (Debian's slurmctld + slurmd + munge) for tests and demos, without systemd or cgroups.
#
#   launch/slurm/local_cluster.sh start STATE_DIR    # ~15-20 s; last stdout line: SLURM_CONF=STATE_DIR/slurm.conf
#   launch/slurm/local_cluster.sh stop STATE_DIR     # cancels its jobs, stops the daemons by their pid files
#   launch/slurm/local_cluster.sh status STATE_DIR   # sinfo + squeue of this cluster
#
# Needs root and `apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge` (nothing starts
# on install). Everything lives under STATE_DIR: munge key, socket and pid, slurm.conf, controller state, spool,
# logs. Ports are the first free ones from 6817 (SLURM_PORT to choose). Clients find the cluster through
# SLURM_CONF=STATE_DIR/slurm.conf; /etc/slurm/slurm.conf is also symlinked to it when that path is free (or already
# a symlink), and the link is removed again by `stop` if it still points here. Daemons are stopped by their pid
# files, never by name, so other Slurm or munge daemons on the machine are left alone.
set -euo pipefail

die() { echo "local_cluster: $*" >&2; exit 1; }
[[ $# -eq 2 ]] || die "usage: $0 start|stop|status STATE_DIR"
cmd=$1
mkdir -p "$2"
STATE=$(cd "$2" && pwd)
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_pidfile() {  # stop_pidfile NAME FILE: TERM, wait up to 10 s, then KILL
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "local_cluster: $name ($pid) ignored SIGTERM for 10 s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "needs root (slurmd runs jobs as their users)"
    for b in munged mungekey slurmctld slurmd sinfo sbatch scontrol; do
        command -v "$b" >/dev/null || die "$b not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
    done
    if [[ -s $STATE/slurmctld.pid ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        die "a cluster already runs in $STATE (stop it first)"
    fi
    local host nproc mem_mb p1 p2
    host=$(hostname -s)
    nproc=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # GNU nproc obeys OMP_NUM_THREADS
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)
    p1=${SLURM_PORT:-6817}
    until port_free "$p1" && port_free "$((p1 + 1))"; do p1=$((p1 + 2)); done
    p2=$((p1 + 1))
    mkdir -p "$STATE/munge" "$STATE/ctld" "$STATE/spool"
    chmod 700 "$STATE/munge"

    # munge: our own key, socket and pid under STATE (root-owned, as munged checks), so a system munged is untouched
    [[ -s $STATE/munge/munge.key ]] || mungekey --create --keyfile="$STATE/munge/munge.key"
    chmod 400 "$STATE/munge/munge.key"
    munged --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed" --force

    cat >"$CONF" <<CONF
# written by launch/slurm/local_cluster.sh
ClusterName=blockprune
SlurmctldHost=$host
SlurmctldPort=$p1
SlurmdPort=$p2
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobRequeue=1
ReturnToService=2
KillWait=30
NodeName=$host CPUs=$nproc RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    mkdir -p /etc/slurm
    if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    else
        echo "local_cluster: /etc/slurm/slurm.conf is a regular file: left alone; use SLURM_CONF=$CONF" >&2
    fi

    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    local state=""
    for _ in $(seq 120); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
        die "node not idle after 60 s (state: ${state:-none}); logs above"
    fi
    echo "local_cluster: node $host idle ($nproc CPUs, ${mem_mb} MB), ports $p1/$p2, state in $STATE" >&2
    echo "SLURM_CONF=$CONF"
}

stop() {
    if [[ -s $STATE/slurmctld.pid ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 50); do [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break; sleep 0.2; done
        fi
    fi
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
    stop_pidfile munged "$STATE/munge/munged.pid"
    if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$CONF" ]]; then
        rm -f /etc/slurm/slurm.conf
    fi
    echo "local_cluster: stopped ($STATE)" >&2
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) die "unknown command $cmd (start|stop|status)" ;;
esac
