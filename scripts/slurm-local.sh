#!/usr/bin/env bash
# Single-node SLURM cluster on this machine, for pfc-sweeps' `slurm` tests and for trying
# `hydra/launcher=slurm` by hand.  Run as root.  No systemd, no cgroups.
#
#   scripts/slurm-local.sh start    install what is missing (apt), write /etc/slurm/*.conf,
#                                   start munged, MariaDB, slurmdbd, slurmctld, slurmd; wait until
#                                   the node is idle and sacct answers.  Idempotent.
#   scripts/slurm-local.sh stop     cancel jobs, stop the daemons by PID, remove runtime files.
#   scripts/slurm-local.sh purge    stop, then delete the state dir and the conf files it wrote.
#   scripts/slurm-local.sh status   daemons, sinfo, squeue; exit 0 only if the cluster is up.
#   scripts/slurm-local.sh env      print export lines for a shell: eval "$(scripts/slurm-local.sh env)"
#
# Environment (all optional):
#   PFC_SLURM_DIR        state dir: logs, pid files, spool, MariaDB datadir (default /tmp/pfc-slurm)
#   PFC_SLURM_PARTITION  partition name (default local)
#   PFC_SLURM_TIMEOUT    seconds to wait for each step of `start` (default 120)
#   PFC_SLURM_DB_PORT    MariaDB port on 127.0.0.1 (default 16819)
#   PFC_SLURM_FORCE=1    overwrite an /etc/slurm/slurm.conf this script did not write
#
# Layout: slurmctld 127.0.0.1:6817, slurmd 127.0.0.1:6818, slurmdbd 127.0.0.1:6819, MariaDB
# 127.0.0.1:$PFC_SLURM_DB_PORT with its own datadir in the state dir, munged on the default socket
# /run/munge/munge.socket.2 (an already running munged is reused) with the key /etc/munge/munge.key.
# Node `localhost` (NodeAddr=127.0.0.1, CPUs=nproc, no GPUs), partition `local` (Default=YES),
# JobRequeue=1, time limits enforced, accounting through slurmdbd (submitit polls sacct: without
# it a job killed before writing its result would make job.result() wait forever).
set -euo pipefail

readonly D="${PFC_SLURM_DIR:-/tmp/pfc-slurm}"
readonly PARTITION="${PFC_SLURM_PARTITION:-local}"
readonly TIMEOUT="${PFC_SLURM_TIMEOUT:-120}"
readonly DB_PORT="${PFC_SLURM_DB_PORT:-16819}"
readonly CLUSTER="pfc"
readonly NODE="localhost"
readonly CONF_DIR="/etc/slurm"
readonly SLURM_CONF_FILE="$CONF_DIR/slurm.conf"
readonly DBD_CONF_FILE="$CONF_DIR/slurmdbd.conf"
readonly MARKER="# managed by pfc-sweeps scripts/slurm-local.sh"
readonly MUNGE_KEY="/etc/munge/munge.key"
readonly PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
readonly RUN="$D/run" LOG="$D/log"
# the default socket: sacctmgr (22.05) ignores AuthInfo=socket= for its slurmdbd connection
readonly MUNGE_SOCKET="/run/munge/munge.socket.2"
readonly DB_SOCKET="$RUN/mysqld.sock"

log() { printf '[slurm-local %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    printf '[slurm-local] ERROR: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# wait_for DESCRIPTION TIMEOUT_S LOGFILE CMD...: poll CMD every 0.5 s until it succeeds.
wait_for() {
    local what="$1" limit="$2" logfile="$3"
    shift 3
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit}s waiting for: $what"
            if [[ -n "$logfile" && -f "$logfile" ]]; then
                log "last lines of $logfile:"
                tail -n 25 "$logfile" >&2 || true
            fi
            die "$what did not come up (state dir $D)"
        fi
        sleep 0.5
    done
}

pid_of() { # pid_of NAME -> prints the pid if its pid file names a live process called NAME
    local f="$RUN/$1.pid" pid
    [[ -s "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    # a stale pid file (e.g. after a reboot) may name an unrelated process
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]] || return 1
    # a killed daemon nobody has reaped yet is a zombie: dead
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
    echo "$pid"
}

require_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages and runs the SLURM daemons)"
}

# ---------------------------------------------------------------------------------------------
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
    log "installing ${missing[*]} (apt-get)"
    # Keep package scripts from starting the daemons (no init system here; we start them ourselves).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    {
        timeout 300 apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q \
                --no-install-recommends -o Dpkg::Options::=--force-confdef \
                -o Dpkg::Options::=--force-confold "${missing[@]}"
    } >"$D/apt.log" 2>&1 || rc=$?
    ((created_policy)) && rm -f "$policy"
    if ((rc != 0)); then
        tail -n 30 "$D/apt.log" >&2
        die "apt-get failed (exit $rc); full log in $D/apt.log"
    fi
}

# ---------------------------------------------------------------------------------------------
real_memory_mb() { # 95% of MemTotal, so slurmd never finds less than configured
    awk '/^MemTotal:/ {printf "%d\n", $2 / 1024 * 0.95}' /proc/meminfo
}

write_if_changed() { # write_if_changed FILE MODE  (content on stdin); returns 0 if it changed
    local file="$1" mode="$2" tmp
    tmp="$(mktemp "$file.XXXXXX")"
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f "$file" ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$file"
    return 0
}

write_configs() { # returns 0 if any conf file changed
    mkdir -p "$CONF_DIR"
    local f
    for f in "$SLURM_CONF_FILE" "$DBD_CONF_FILE"; do
        if [[ -f "$f" ]] && ! grep -qF "$MARKER" "$f"; then
            [[ "${PFC_SLURM_FORCE:-0}" == 1 ]] ||
                die "$f exists and was not written by this script; set PFC_SLURM_FORCE=1 to replace it (a copy is kept as $f.pfc-bak)"
            cp -p "$f" "$f.pfc-bak"
        fi
    done
    local cpus mem changed=1
    cpus="$(nproc)"
    mem="$(real_memory_mb)"
    write_if_changed "$SLURM_CONF_FILE" 644 <<EOF && changed=0
$MARKER (state dir $D); edits are overwritten by \`start\`.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# A requeued job waits cred_expire (default 120 s) before it may start again: keep tests quick.
AuthInfo=cred_expire=10
CredType=cred/munge
# bind to the loopback addresses the names resolve to instead of INADDR_ANY
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
# requeue (scontrol requeue, preemption) and time limits
JobRequeue=1
EnforcePartLimits=ALL
OverTimeLimit=0
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=60
SlurmdTimeout=60
# accounting through slurmdbd (sacct is what submitit polls)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    local pass
    pass="$(cat "$D/db.pass")"
    write_if_changed "$DBD_CONF_FILE" 600 <<EOF && changed=0
$MARKER (state dir $D); edits are overwritten by \`start\`.
AuthType=auth/munge
DbdAddr=127.0.0.1
CommunicationParameters=NoInAddrAny
DbdHost=$NODE
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    return "$changed"
}

# ---------------------------------------------------------------------------------------------
munge_works() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }

start_munge() {
    pid_of munged >/dev/null && return 0
    if munge_works >/dev/null 2>&1; then
        log "using the munged already serving $MUNGE_SOCKET"
        return 0
    fi
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    # munged runs as root here and refuses keys/dirs it considers insecure: keep them root-only.
    chown root:root "$MUNGE_KEY" "$(dirname "$MUNGE_KEY")"
    chmod 600 "$MUNGE_KEY"
    chmod 700 "$(dirname "$MUNGE_KEY")"
    mkdir -p "$(dirname "$MUNGE_SOCKET")"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    log "starting munged"
    munged --force --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$D/munged.seed" >>"$LOG/munged.log" 2>&1 9>&- ||
        {
            tail -n 20 "$LOG/munged.log" >&2
            die "munged failed to start"
        }
    wait_for "munged" "$TIMEOUT" "$LOG/munged.log" munge_works
}

db_cli() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot; }

start_db() {
    pid_of mariadbd >/dev/null && return 0
    local datadir="$D/mysql"
    if [[ ! -d "$datadir/mysql" ]]; then
        log "initialising MariaDB datadir $datadir"
        rm -rf "$datadir"
        mkdir -p "$datadir"
        mariadb-install-db --no-defaults --user=root --datadir="$datadir" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 ||
            {
                tail -n 20 "$LOG/mariadb-install.log" >&2
                die "mariadb-install-db failed"
            }
    fi
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    rm -f "$DB_SOCKET"
    setsid mariadbd --no-defaults --user=root --datadir="$datadir" \
        --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadb.log" \
        --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=128M \
        --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
        --max-connections=64 </dev/null >>"$LOG/mariadb.log" 2>&1 9>&- &
    wait_for "MariaDB" "$TIMEOUT" "$LOG/mariadb.log" \
        mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping
    wait_for "mariadbd pid file" "$TIMEOUT" "$LOG/mariadb.log" pid_of mariadbd
    local pass
    pass="$(cat "$D/db.pass")"
    db_cli <<EOF || die "could not create the slurm database user"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

start_dbd() {
    pid_of slurmdbd >/dev/null && return 0
    log "starting slurmdbd"
    slurmdbd >>"$LOG/slurmdbd.log" 2>&1 9>&- || {
        tail -n 20 "$LOG/slurmdbd.log" >&2
        die "slurmdbd failed to start"
    }
    wait_for "slurmdbd" "$TIMEOUT" "$LOG/slurmdbd.log" sacctmgr -n -P show cluster
    if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER in the accounting database"
        timeout 60 sacctmgr -i add cluster "$CLUSTER" >/dev/null ||
            die "sacctmgr add cluster $CLUSTER failed"
    fi
}

start_ctld() {
    pid_of slurmctld >/dev/null && return 0
    log "starting slurmctld"
    slurmctld >>"$LOG/slurmctld.log" 2>&1 9>&- || {
        tail -n 20 "$LOG/slurmctld.log" >&2
        die "slurmctld failed to start"
    }
    wait_for "slurmctld" "$TIMEOUT" "$LOG/slurmctld.log" scontrol ping
}

start_slurmd() {
    pid_of slurmd >/dev/null && return 0
    log "starting slurmd (node $NODE)"
    slurmd -N "$NODE" >>"$LOG/slurmd.log" 2>&1 9>&- || {
        tail -n 20 "$LOG/slurmd.log" >&2
        die "slurmd failed to start"
    }
}

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1; }
node_idle() { [[ "$(node_state)" == idle ]]; }

wait_ready() {
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while :; do
        state="$(timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1 || true)"
        case "$state" in
        idle | mix | alloc) break ;;
        drain* | down* | inval* | fail*)
            # a node left down by an earlier run (unexpected reboot, config change)
            timeout 10 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            ;;
        esac
        if ((SECONDS >= deadline)); then
            log "node state: '${state:-<none>}'"
            tail -n 20 "$LOG/slurmd.log" "$LOG/slurmctld.log" >&2 || true
            die "node $NODE did not become idle within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    wait_for "sacct (slurmdbd accounting)" "$TIMEOUT" "$LOG/slurmdbd.log" \
        timeout 10 sacct -n -X -S now-1hours
}

cmd_start() {
    require_root
    mkdir -p "$D" "$RUN" "$LOG" "$D/state" "$D/spool/slurmd" 2>/dev/null ||
        die "cannot create the state dir $D (PFC_SLURM_DIR)"
    chmod 700 "$D"
    exec 9>"$D/.lock"
    flock -w "$TIMEOUT" 9 || die "another slurm-local.sh holds $D/.lock"
    local t0=$SECONDS
    install_packages
    [[ -s "$D/db.pass" ]] || (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$D/db.pass")
    if write_configs && { pid_of slurmctld || pid_of slurmd || pid_of slurmdbd; } >/dev/null; then
        log "configuration changed: restarting the SLURM daemons"
        stop_daemons slurmd slurmctld slurmdbd
    fi
    start_munge
    start_db
    start_dbd
    start_ctld
    start_slurmd
    wait_ready
    log "cluster up in $((SECONDS - t0))s: partition '$PARTITION', node $NODE, $(nproc) CPUs, no GPUs; logs in $LOG"
    timeout 10 sinfo >&2 || true
}

# ---------------------------------------------------------------------------------------------
stop_daemons() { # stop_daemons NAME...: SIGTERM by pid file, SIGKILL after 20 s
    local name pid i
    for name in "$@"; do
        pid="$(pid_of "$name")" || {
            rm -f "$RUN/$name.pid"
            continue
        }
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$RUN/$name.pid"
    done
}

cmd_stop() {
    require_root
    [[ -d "$D" ]] || {
        log "nothing to stop ($D does not exist)"
        return 0
    }
    if pid_of slurmctld >/dev/null; then
        local jobs
        jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)"
        if [[ -n "${jobs// /}" ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 20))
            while [[ -n "$(timeout 10 squeue -h -o %A 2>/dev/null || true)" ]] && ((SECONDS < deadline)); do
                sleep 0.5
            done
        fi
    fi
    local had_munged=0
    pid_of munged >/dev/null && had_munged=1
    stop_daemons slurmd slurmctld slurmdbd mariadbd munged
    ((had_munged)) && rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    rm -f "$DB_SOCKET" "$D/.lock"
    log "stopped"
}

cmd_purge() {
    cmd_stop
    local f
    for f in "$SLURM_CONF_FILE" "$DBD_CONF_FILE"; do
        if [[ -f "$f" ]] && grep -qF "$MARKER" "$f"; then
            rm -f "$f"
            [[ -f "$f.pfc-bak" ]] && mv -f "$f.pfc-bak" "$f"
        fi
    done
    rm -rf "$D"
    log "removed $D and the conf files this script wrote"
}

cmd_status() {
    local name pid up=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if pid="$(pid_of "$name")"; then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-10s stopped\n' "$name"
            up=1
        fi
    done
    if ((up == 0)); then
        timeout 10 sinfo || up=1
        timeout 10 squeue || up=1
    fi
    return "$up"
}

cmd_env() { # what conf/hydra/launcher/slurm.yaml reads: this cluster has no GPUs and few CPUs
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
    echo "export PFC_SLURM_PARTITION=$PARTITION"
    echo "export PFC_SLURM_GPUS_PER_NODE=0"
    echo "export PFC_SLURM_CPUS_PER_TASK=1"
    echo "export PFC_SLURM_MEM_GB=1"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
purge) cmd_purge ;;
status) cmd_status ;;
env) cmd_env ;;
*) usage ;;
esac
