#!/usr/bin/env bash
# Stop what scripts/slurm-up.sh started: cancel the cluster's jobs, then stop
# sshd, slurmd, slurmctld and munged by the pids they wrote. Idempotent. The
# state directory stays (configs and logs, for reading after a failure).
set -uo pipefail

DIR=${KSCOPE_SLURM_DIR:-/tmp/kscope-slurm}
export SLURM_CONF=$DIR/slurm.conf PATH=/usr/sbin:$PATH

# stop PIDFILE NAME: SIGTERM the pid in PIDFILE if it still runs NAME, wait, then SIGKILL.
stop() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
}

running() { [ -r "$1" ] && [ -r "/proc/$(cat "$1")/comm" ] && [ "$(cat "/proc/$(cat "$1")/comm")" = "$2" ]; }

# Jobs first: slurmstepd and the job's processes outlive slurmd otherwise.
if running "$DIR/ctld/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        # shellcheck disable=SC2086 # one argument per job id
        scancel $jobs 2>/dev/null
        for _ in $(seq 150); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

stop "$DIR/ssh/sshd.pid" sshd
stop "$DIR/spool/slurmd.pid" slurmd
stop "$DIR/ctld/slurmctld.pid" slurmctld
stop "$DIR/munge/munged.pid" munged
echo "slurm-down: stopped what slurm-up started in $DIR"
