#!/usr/bin/env bash
# A single-host Grid Engine (Debian 12's Son of Grid Engine 8.1.9) on localhost, for the launch tests.
# Needs root and Debian's package archive; works without systemd (starts the daemons itself).
#
#   .ci/start-gridengine.sh        install if missing, configure, start what is not running, run a test job
#   .ci/start-gridengine.sh stop   stop sge_execd and sge_qmaster
#
# Re-running is cheap: configuration is re-applied and only dead daemons are started.
# Knobs: SGE_SLOTS (slots of all.q, default 4; may exceed the CPUs), SGE_NOTIFY (time between the
# -notify warning signal and the kill, default 00:00:05).
# Use the cluster with: export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
set -euo pipefail

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
SLOTS=${SGE_SLOTS:-4}
NOTIFY=${SGE_NOTIFY:-00:00:05}
COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOL=/var/spool/gridengine
QMASTER_PID=$SPOOL/qmaster/qmaster.pid
TMP=$(mktemp -d /tmp/keizoku-sge.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

say() { echo "[gridengine] $*" >&2; }
pid_in() { [ -r "$1" ] && tr -dc '0-9' <"$1" || true; }
running() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
poll() { # poll SECONDS CMD...: until CMD succeeds
    local end=$(($(date +%s) + $1)); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.5; done
}
stop() {
    local f p
    for f in $SPOOL/execd/*/execd.pid $QMASTER_PID; do
        [ -e "$f" ] || continue
        p=$(pid_in "$f")
        if running "$p"; then # qmaster takes seconds to exit; a second one started meanwhile would fight it
            kill "$p" || true
            for _ in $(seq 60); do running "$p" || break; sleep 0.5; done
            running "$p" && kill -9 "$p" || true
        fi
        rm -f "$f"
    done
}

if [ "${1:-}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "start-gridengine.sh: needs root" >&2; exit 1; }

HOST=$(hostname)
getent hosts "$HOST" >/dev/null || echo "127.0.1.1 $HOST" >>/etc/hosts

if [ "$(dpkg-query -W -f='${Status}\n' gridengine-master gridengine-exec gridengine-client 2>/dev/null |
        grep -c 'install ok installed')" != 3 ]; then
    say "installing gridengine-master gridengine-exec gridengine-client"
    for p in gridengine-common gridengine-master gridengine-exec gridengine-client; do # answer debconf first
        echo "$p shared/gridengineconfig boolean true"
        echo "$p shared/gridenginecell string $SGE_CELL"
        echo "$p shared/gridenginemaster string $HOST"
    done | debconf-set-selections
    ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1 || apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        gridengine-master gridengine-exec gridengine-client >/dev/null
fi
if [ ! -s "$COMMON/bootstrap" ] || [ -z "$(ls -A $SPOOL/spooldb 2>/dev/null)" ]; then
    say "creating cell $SGE_CELL"
    install -d -o sgeadmin -g sgeadmin $SGE_ROOT/$SGE_CELL "$COMMON" $SPOOL/qmaster $SPOOL/qmaster/job_scripts \
        $SPOOL/spooldb $SPOOL/execd
    [ -s "$COMMON/bootstrap" ] ||
        install -m0644 -o sgeadmin -g sgeadmin /usr/share/gridengine/default-bootstrap "$COMMON/bootstrap"
    su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL $SPOOL/spooldb sgeadmin" sgeadmin
fi
install -d -o sgeadmin -g sgeadmin $SPOOL/execd /var/run/gridengine

# Clients announce $(hostname) but connect from 127.0.0.1, which resolves to "localhost"; without this
# alias every qsub/execd call fails with "access denied (client IP resolved to host name localhost ...)".
changed=
if [ "$(cat "$COMMON/host_aliases" 2>/dev/null)" != "$HOST localhost" ]; then
    echo "$HOST localhost" >"$COMMON/host_aliases"; changed=1
fi
SGEHOST=$(/usr/lib/gridengine/gethostname -name)
if [ "$(cat "$COMMON/act_qmaster" 2>/dev/null)" != "$SGEHOST" ]; then
    echo "$SGEHOST" >"$COMMON/act_qmaster"; changed=1
fi
chown sgeadmin:sgeadmin "$COMMON/host_aliases" "$COMMON/act_qmaster"

pid=$(pid_in $QMASTER_PID)
if running "$pid" && { [ -n "$changed" ] || ! qconf -sh >/dev/null 2>&1; }; then
    say "restarting sge_qmaster (host names changed)"; stop; pid=
fi
if ! running "$pid"; then
    say "starting sge_qmaster"
    /usr/sbin/sge_qmaster
    poll 60 qconf -sh || { tail -n 20 $SPOOL/qmaster/messages >&2; exit 1; }
fi

apply() { # apply KIND NAME FILE: modify if it exists, else add (qconf cannot edit through $EDITOR here)
    local list=$1 name=$2 file=$3 flag=${1:2:1}
    if qconf "$list" 2>/dev/null | grep -qx "$name"; then qconf "-M$flag" "$file" >/dev/null
    else qconf "-A$flag" "$file" >/dev/null; fi
}
qconf -sconf global | sed -e '1{/^#/d}' -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
    -e 's/^load_report_time .*/load_report_time 00:00:05/' >"$TMP/global"
qconf -Mconf "$TMP/global" >/dev/null                    # root may run jobs
qconf -ssconf | sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' -e 's/^flush_finish_sec .*/flush_finish_sec 1/' >"$TMP/sconf"
qconf -Msconf "$TMP/sconf" >/dev/null                    # schedule every second, not every 15
qconf -sh | grep -qx "$SGEHOST" || qconf -ah "$SGEHOST" >/dev/null
qconf -ss | grep -qx "$SGEHOST" || qconf -as "$SGEHOST" >/dev/null
printf '%s\n' "hostname $SGEHOST" "load_scaling NONE" "complex_values NONE" "user_lists NONE" "xuser_lists NONE" \
    "projects NONE" "xprojects NONE" "usage_scaling NONE" "report_variables NONE" >"$TMP/$SGEHOST"
apply -sel "$SGEHOST" "$TMP/$SGEHOST"
# smp: all slots on one host; mpi: round robin over hosts (on one host both give one PE_HOSTFILE line).
# control_slaves TRUE: tight integration, so `qrsh -inherit` may start tasks on the job's hosts.
for pe in 'smp $pe_slots' 'mpi $round_robin'; do
    set -- $pe
    printf '%s\n' "pe_name $1" "slots 9999" "user_lists NONE" "xuser_lists NONE" "start_proc_args NONE" \
        "stop_proc_args NONE" "allocation_rule $2" "control_slaves TRUE" "job_is_first_task FALSE" \
        "urgency_slots min" "accounting_summary FALSE" "qsort_args NONE" >"$TMP/$1"
    apply -spl "$1" "$TMP/$1"
done
{ qconf -sq all.q 2>/dev/null || qconf -sq; } >"$TMP/all.q"
sed -i -e ':a' -e '/\\$/{N;s/\\\n[[:space:]]*/ /;ba' -e '}' "$TMP/all.q"     # join continued lines
sed -i -e 's/^qname .*/qname all.q/' -e "s/^hostlist .*/hostlist $SGEHOST/" -e "s/^slots .*/slots $SLOTS/" \
    -e 's#^shell .*#shell /bin/bash#' -e 's/^load_thresholds .*/load_thresholds NONE/' \
    -e 's/^pe_list .*/pe_list smp mpi/' -e "s/^notify .*/notify $NOTIFY/" "$TMP/all.q"
apply -sql all.q "$TMP/all.q"

alive=
for f in $SPOOL/execd/*/execd.pid; do [ -e "$f" ] && running "$(pid_in "$f")" && alive=1; done
if [ -z "$alive" ]; then say "starting sge_execd"; /usr/sbin/sge_execd; fi
queue_up() { qstat -f -q "all.q@$SGEHOST" | awk -v q="all.q@$SGEHOST" '$1 == q && NF == 5 {ok = 1} END {exit !ok}'; }
poll 60 queue_up || { qstat -f >&2; exit 1; }
qmod -c "all.q@$SGEHOST" >/dev/null 2>&1 || true         # clear an error state left by an earlier run

(cd "$TMP" && qsub -sync y -b y -N keizoku-smoke -o /dev/null -j y -pe smp 1 /bin/true >/dev/null) ||
    { echo "start-gridengine.sh: the test job failed" >&2; exit 1; }
say "up: all.q@$SGEHOST with $SLOTS slots, PEs smp and mpi"
