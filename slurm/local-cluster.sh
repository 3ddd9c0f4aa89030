#!/usr/bin/env bash
# A real one-node Slurm on localhost, for the project's tests and CI.
#
#   bash slurm/local-cluster.sh start    # install (if missing), configure, start; wait for the node
#   bash slurm/local-cluster.sh stop     # cancel all jobs, shut the daemons down (idempotent)
#   bash slurm/local-cluster.sh status   # exit 0 iff the controller answers and the node is usable
#
# Needs root and Debian/Ubuntu (apt-get). Uses Debian's slurmctld/slurmd/slurm-client and munge;
# config goes to /etc/slurm/slurm.conf (where Debian's Slurm reads it), rendered from
# slurm/slurm.conf.template. Controller state, spool, pid files and logs live under
# /tmp/slurm-local (SLURM_LOCAL_ROOT), WIPED at every start: job ids restart at 1, so every test
# and CV run must use a fresh submitit folder (a reused `.../%j` folder returns stale pickles).
#
# Choices:
# - CPUs = max(nproc, 4) so 4-rank gloo tests fit on a 2-core machine (oversubscribed on purpose);
#   RealMemory = MemTotal in MB minus 1024. Override with SLURM_LOCAL_CPUS / SLURM_LOCAL_MEM_MB.
# - No accounting (no slurmdbd/MariaDB). Accounting would add ~8 s of installation plus a database
#   daemon to start, own and stop without systemd, i.e. more ways for CI to fail or hang, and it
#   only buys a better `sacct` state for submitit. Consequence (see
#   ../shared/notes/slurm-localhost.md): submitit logs "Bypassing sacct error", `job.state` is
#   UNKNOWN, and a job killed before writing its result pickle makes a bare `job.result()` wait
#   forever. So every wait on a job carries a deadline and watches the job through
#   squeue/`scontrol show job` (tests/slurm_util.py: wait_job, wait_submitit; the project's
#   launcher does the same). A finished job stays visible there for MinJobAge (5 s).
# - A second partition `urgent` (PriorityTier 10, preempt/partition_prio, PreemptMode=REQUEUE)
#   exists for preemption tests: a job there preempts `debug` jobs, which get their --signal (USR2
#   for submitit) and GraceTime=20 s before Slurm kills and requeues them. `debug` is the default.
# - Daemons are started with stdio redirected to files (a daemon holding CI's stdout would keep the
#   runner waiting), stopped through `scontrol shutdown` and then by their recorded pids (never by
#   process name). Readiness is polled against a deadline, never a fixed sleep.
set -euo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm-local}
CONF=/etc/slurm/slurm.conf
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE=$HERE/slurm.conf.template
START_DEADLINE_S=${SLURM_LOCAL_START_TIMEOUT:-30}
STOP_DEADLINE_S=${SLURM_LOCAL_STOP_TIMEOUT:-30}
PKGS=(slurmctld slurmd slurm-client munge)

log() { printf '[local-cluster] %s\n' "$*"; }
die() { printf '[local-cluster] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, writes $CONF, /etc/hosts)"; }

node_name() { hostname -s; }

# Client commands get a short timeout: with the controller down they retry for ~MessageTimeout.
sq() { timeout 10 "$@" 2>/dev/null; }

controller_up() {
    command -v scontrol >/dev/null 2>&1 && [[ -f $CONF ]] || return 1
    local out
    out=$(sq scontrol ping) || return 1
    [[ $out == *"is UP"* ]]
}

# Distinct node states (sinfo -N prints the node once per partition). A state with a flag suffix
# (`*` not responding, `~`, `#`, `!`, `%`, `$`, `@`) or anything but the ones below is unusable.
node_states() { sq sinfo -h -N -o %T | sort -u || true; }

node_usable() {
    local st
    st=$(node_states)
    [[ -n $st ]] || return 1
    while read -r s; do
        case $s in
            idle|mixed|allocated|completing) ;;
            *) return 1 ;;
        esac
    done <<<"$st"
}

log_tail() {
    local f
    for f in "$ROOT"/log/slurmctld.log "$ROOT"/log/slurmd.log "$ROOT"/log/slurmctld.out \
             "$ROOT"/log/slurmd.out "$ROOT"/log/munged.out /var/log/munge/munged.log; do
        [[ -s $f ]] || continue
        printf -- '----- tail %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

# A pid from a pid file, only if that process is alive, not a zombie, and runs the expected program
# (guards against a recycled pid).
live_pid() {
    local pidfile=$1 comm=$2 pid stat
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -d /proc/$pid ]] || return 1
    stat=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $stat != Z && $stat != X ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}

# Wait until the process of a pid file is gone (zombies count as gone): a few seconds for a
# graceful exit (after `scontrol shutdown`; $3, default 3), then SIGTERM, then SIGKILL.
reap() {
    local pidfile=$1 comm=$2 grace=${3:-3} pid start t
    pid=$(live_pid "$pidfile" "$comm") || { rm -f "$pidfile"; return 0; }
    start=$(date +%s)
    while live_pid "$pidfile" "$comm" >/dev/null; do
        t=$(( $(date +%s) - start ))
        if (( t >= 10 )); then
            log "$comm (pid $pid) still alive after 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            break
        elif (( t >= grace )); then
            kill -TERM "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
    rm -f "$pidfile"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    (( ${#missing[@]} == 0 )) && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    local t0; t0=$(now)
    log "installing ${PKGS[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d / debconf noise is expected in containers: keep it in a file, show it on failure.
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${PKGS[@]}"; } \
            </dev/null >/tmp/slurm-local-apt.log 2>&1; then
        tail -n 30 /tmp/slurm-local-apt.log >&2
        die "apt-get failed (full log: /tmp/slurm-local-apt.log)"
    fi
    log "packages installed in $(elapsed "$t0") s"
}

write_conf() {
    local node cpus mem nproc_ mem_kb
    node=$(node_name)
    nproc_=$(nproc)
    cpus=${SLURM_LOCAL_CPUS:-$(( nproc_ > 4 ? nproc_ : 4 ))}
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mem=${SLURM_LOCAL_MEM_MB:-$(( mem_kb / 1024 - 1024 ))}
    (( mem > 0 )) || mem=1024
    [[ -f $TEMPLATE ]] || die "template not found: $TEMPLATE"
    mkdir -p /etc/slurm
    sed -e "s|@NODE@|$node|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM@|$mem|g" -e "s|@ROOT@|$ROOT|g" \
        "$TEMPLATE" >"$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
    chmod 0644 "$CONF"
    log "wrote $CONF: node $node, CPUs=$cpus (nproc $nproc_), RealMemory=${mem} MB"
}

ensure_hosts() {
    local node; node=$(node_name)
    if ! getent hosts "$node" >/dev/null 2>&1; then
        echo "127.0.0.1 $node" >>/etc/hosts
        log "added '127.0.0.1 $node' to /etc/hosts"
    fi
}

munge_ok() { command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        log "munge already running"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force >/dev/null
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    # Without systemd nothing creates these.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    # a stale socket/pid from a killed munged makes the new one refuse to start
    if ! live_pid /run/munge/munged.pid munged >/dev/null; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    runuser -u munge -- munged </dev/null >>"$ROOT/log/munged.out" 2>&1 \
        || { log_tail; die "munged failed to start"; }
    local deadline=$(( $(date +%s) + 10 ))
    until munge_ok; do
        (( $(date +%s) < deadline )) || { log_tail; die "munge -n | unmunge still fails after 10 s"; }
        sleep 0.1
    done
    # Remember that we started it, so that `stop` stops it (and only then).
    cp /run/munge/munged.pid "$ROOT/run/munged.pid" 2>/dev/null || true
    log "munged started"
}

start_daemons() {
    local t0 deadline st
    t0=$(now)
    slurmctld </dev/null >>"$ROOT/log/slurmctld.out" 2>&1 || { log_tail; die "slurmctld failed to start"; }
    slurmd </dev/null >>"$ROOT/log/slurmd.out" 2>&1 || { log_tail; die "slurmd failed to start"; }
    deadline=$(( $(date +%s) + START_DEADLINE_S ))
    while :; do
        st=$(node_states | tr '\n' ' ')
        [[ $st == "idle " ]] && break
        if (( $(date +%s) >= deadline )); then
            log_tail
            die "node not idle after ${START_DEADLINE_S} s (sinfo says: '${st% }'; scontrol ping: $(sq scontrol ping || echo failed))"
        fi
        sleep 0.1
    done
    log "slurmctld + slurmd up, node $(node_name) idle after $(elapsed "$t0") s"
}

cmd_start() {
    need_root
    local t0; t0=$(now)
    install_packages
    if controller_up && node_usable; then
        log "already running (node $(node_name): $(node_states | tr '\n' ' '))"
        return 0
    fi
    # Half-started or stale: clean up what we recorded before wiping the state.
    stop_daemons quiet
    rm -rf "$ROOT"
    mkdir -p "$ROOT"/state "$ROOT"/spool "$ROOT"/run "$ROOT"/log
    chmod 0755 "$ROOT"
    write_conf
    ensure_hosts
    start_munge
    start_daemons
    log "started in $(elapsed "$t0") s; logs under $ROOT/log"
}

# Stop slurm daemons (and munged, if we started it). Idempotent; never kills by name.
stop_daemons() {
    local quiet=${1:-} ids deadline
    if controller_up; then
        ids=$(sq squeue -h -o %A | sort -u | tr '\n' ' ' || true)
        if [[ -n ${ids// /} ]]; then
            [[ -n $quiet ]] || log "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            sq scancel $ids || true
            # scancel sends SIGTERM, SIGKILL KillWait (10 s) later: wait for the jobs to leave.
            deadline=$(( $(date +%s) + STOP_DEADLINE_S ))
            while [[ -n $(sq squeue -h -o %A || true) ]]; do
                (( $(date +%s) < deadline )) || { log "jobs still present after ${STOP_DEADLINE_S} s, shutting down anyway"; break; }
                sleep 0.2
            done
        fi
        sq scontrol shutdown >/dev/null || true
    fi
    reap "$ROOT/run/slurmctld.pid" slurmctld
    reap "$ROOT/run/slurmd.pid" slurmd
    reap "$ROOT/run/munged.pid" munged 0
}

cmd_stop() {
    need_root
    local t0; t0=$(now)
    if [[ ! -d $ROOT ]] && ! controller_up; then
        log "not running"
        return 0
    fi
    stop_daemons
    log "stopped in $(elapsed "$t0") s"
}

cmd_status() {
    if ! command -v scontrol >/dev/null 2>&1; then
        echo "slurm: not installed"; return 1
    fi
    if ! controller_up; then
        echo "slurm: controller not answering (scontrol ping)"; return 1
    fi
    local st; st=$(node_states | tr '\n' ' ')
    if node_usable; then
        echo "slurm: up, node $(node_name) ${st% }"
        sq squeue -o '%.8i %.9P %.20j %.8T %.10M %.5D %R' || true
        return 0
    fi
    echo "slurm: controller up, node not usable: '${st% }'"
    return 1
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
