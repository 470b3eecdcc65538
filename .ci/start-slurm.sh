#!/usr/bin/env bash
# A single-host Slurm (Debian 12's 22.05) on localhost for the launch tests, emulating several compute
# nodes with one slurmd per node (slurmd -N nodeI, each on its own port). Needs root; no systemd needed.
#
#   .ci/start-slurm.sh        install if missing, configure, start what is not running, run a test job
#   .ci/start-slurm.sh stop   stop the slurmds, slurmctld and munged
#
# Knobs: SLURM_NODES (emulated nodes, default 2), SLURM_CPUS_PER_NODE (declared CPUs per node, default 2;
# may exceed the real count), SLURM_KILLWAIT (seconds from SIGTERM to SIGKILL at the time limit, default 5).
set -euo pipefail

NODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS_PER_NODE:-2}
KILLWAIT=${SLURM_KILLWAIT:-5}
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
CONF=/etc/slurm/slurm.conf
RUN=/run/slurm
MUNGE_PID=/run/munge/munged.pid

say() { echo "[slurm] $*" >&2; }
pid_in() { [ -r "$1" ] && tr -dc '0-9' <"$1" || true; }
running() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
poll() { # poll SECONDS CMD...: until CMD succeeds
    local end=$(($(date +%s) + $1)); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.5; done
}
stop_pidfile() {
    local p; p=$(pid_in "$1")
    if running "$p"; then
        kill "$p" || true
        for _ in $(seq 40); do running "$p" || break; sleep 0.5; done
        running "$p" && kill -9 "$p" || true
    fi
    rm -f "$1"
}
stop_slurm() { local f; for f in $RUN/slurmd-*.pid $RUN/slurmctld.pid; do [ -e "$f" ] && stop_pidfile "$f"; done; true; }

if [ "${1:-}" = stop ]; then stop_slurm; stop_pidfile $MUNGE_PID; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "start-slurm.sh: needs root" >&2; exit 1; }

HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.1.1 $HOST" >>/etc/hosts

if [ "$(dpkg-query -W -f='${Status}\n' slurmctld slurmd slurm-client munge 2>/dev/null |
        grep -c 'install ok installed')" != 4 ]; then
    say "installing slurmctld slurmd slurm-client munge"
    ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1 || apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi

install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --pid-file=$MUNGE_PID
    poll 20 sh -c 'munge -n </dev/null | unmunge'
fi

install -d /var/spool/slurmctld /var/spool/slurmd /var/log/slurm $RUN
NEW=$(mktemp /tmp/keizoku-slurm.conf.XXXXXX)
trap 'rm -f "$NEW"' EXIT
{
    echo "# written by keizoku's .ci/start-slurm.sh: $NODES emulated node(s) x $CPUS CPU(s) on $HOST"
    printf '%s\n' ClusterName=local "SlurmctldHost=$HOST(127.0.0.1)" SlurmUser=root SlurmdUser=root \
        AuthType=auth/munge CryptoType=crypto/munge MpiDefault=none \
        ProctrackType=proctrack/linuxproc TaskPlugin=task/none JobAcctGatherType=jobacct_gather/linux \
        AccountingStorageType=accounting_storage/none JobCompType=jobcomp/none \
        SelectType=select/cons_tres SelectTypeParameters=CR_Core SchedulerType=sched/backfill \
        SlurmdParameters=config_overrides ReturnToService=2 \
        StateSaveLocation=/var/spool/slurmctld 'SlurmdSpoolDir=/var/spool/slurmd/%n' \
        SlurmctldPidFile=$RUN/slurmctld.pid "SlurmdPidFile=$RUN/slurmd-%n.pid" \
        SlurmctldLogFile=/var/log/slurm/slurmctld.log 'SlurmdLogFile=/var/log/slurm/slurmd-%n.log' \
        SlurmctldPort=6817 KillWait=$KILLWAIT OverTimeLimit=0 InactiveLimit=0 MinJobAge=300
    # config_overrides above: declared CPUs may exceed the real ones without the nodes going DRAIN
    for i in $(seq "$NODES"); do
        echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS RealMemory=1000 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
} >"$NEW"
if ! cmp -s "$NEW" $CONF; then
    say "writing $CONF"
    stop_slurm
    install -m 0644 "$NEW" $CONF
    rm -f /var/spool/slurmctld/clustername   # else "CLUSTER NAME MISMATCH" after a change
fi

running "$(pid_in $RUN/slurmctld.pid)" || { say "starting slurmctld"; slurmctld; }
poll 30 scontrol ping || { tail -n 20 /var/log/slurm/slurmctld.log >&2; exit 1; }
for i in $(seq "$NODES"); do
    running "$(pid_in $RUN/slurmd-node$i.pid)" || { say "starting slurmd -N node$i"; slurmd -N "node$i"; }
done
all_idle() { [ "$(sinfo -h -N -o '%N %t' | awk '$2 ~ /^(idle|mix|alloc)$/' | wc -l)" -ge "$NODES" ]; }
if ! poll 30 all_idle; then
    scontrol update NodeName="node[1-$NODES]" State=RESUME 2>/dev/null || true   # left DOWN by an earlier run
    poll 30 all_idle || { sinfo -N -l >&2; tail -n 20 /var/log/slurm/slurmd-node1.log >&2; exit 1; }
fi

srun -n1 -t 1 -J keizoku-smoke /bin/true || { echo "start-slurm.sh: the test job failed" >&2; exit 1; }
say "up: $(sinfo -h -o '%D nodes, %C CPUs (allocated/idle/other/total)'), partition debug"
