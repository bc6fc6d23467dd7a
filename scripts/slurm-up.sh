#!/usr/bin/env bash
# A single-node SLURM (munged, slurmctld, slurmd) and an sshd on 127.0.0.1, for
# the SLURM tests and for trying the slurm launcher by hand. Idempotent: what
# already runs is left alone. Everything lives in $KSCOPE_SLURM_DIR
# (default /tmp/kscope-slurm); scripts/slurm-down.sh stops what this started.
#
# Needs Debian's packages (no systemd involved):
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge openssh-server
#
# Writes $KSCOPE_SLURM_DIR/env.sh (for shells) and env.json (for tests) naming
# SLURM_CONF, the ssh port, the client key and a known_hosts file.
set -euo pipefail

DIR=${KSCOPE_SLURM_DIR:-/tmp/kscope-slurm}
CTLD_PORT=${KSCOPE_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${KSCOPE_SLURMD_PORT:-6818}
SSH_PORT=${KSCOPE_SLURM_SSH_PORT:-22022}
HOST=$(hostname -s) # slurmctld insists on the real short hostname

for bin in munged slurmctld slurmd sbatch squeue scancel sshd ssh-keygen; do
    command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || {
        echo "slurm-up: $bin is missing; install Debian's packages:" >&2
        echo "  apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge openssh-server" >&2
        exit 1
    }
done
export PATH=/usr/sbin:$PATH

mkdir -p "$DIR"/{munge,ctld,spool,log,ssh}
chmod 700 "$DIR/munge" "$DIR/ssh"
export SLURM_CONF=$DIR/slurm.conf

# alive PIDFILE NAME: the pid in PIDFILE runs the program NAME (a recycled pid
# that now belongs to something else does not count).
alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

wait_for() { # wait_for SECONDS WHAT COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "slurm-up: $what did not come up; logs in $DIR/log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

# --- munge: its own key and socket, so the system's munge is not touched -----------------
if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    chmod 400 "$DIR/munge/munge.key"
fi
if ! alive "$DIR/munge/munged.pid" munged; then
    # --force: munged refuses to run as root, and as root is how this machine runs.
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
        --log-file="$DIR/log/munged.log"
fi
wait_for 10 munged test -S "$DIR/munge/munge.socket"

# --- slurm.conf ------------------------------------------------------------------------------
cat >"$SLURM_CONF.new" <<EOF
# Written by scripts/slurm-up.sh: a one-node cluster for KScope's tests.
ClusterName=kscope
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/ctld/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups here (no systemd): track job processes by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Start jobs the moment they are submitted (the default waits for a batch).
SchedulerParameters=batch_sched_delay=0
# The node declares more CPUs than the machine has, so a rotation's two jobs fit.
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
mv "$SLURM_CONF.new" "$SLURM_CONF"

if ! alive "$DIR/ctld/slurmctld.pid" slurmctld; then
    slurmctld -f "$SLURM_CONF"
fi
wait_for 20 slurmctld scontrol ping
if ! alive "$DIR/spool/slurmd.pid" slurmd; then
    mkdir -p "$DIR/spool/$HOST"
    slurmd -f "$SLURM_CONF"
fi
node_ready() { sinfo -h -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
if ! wait_for_node=$(node_ready && echo yes); then :; fi
if [ "$wait_for_node" != yes ]; then
    # A node that was down when slurmctld last saw it needs a nudge.
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
fi
wait_for 20 "slurmd (node $HOST)" node_ready

# --- sshd on loopback: its own host key, and a client key in authorized_keys --------------
SSH=$DIR/ssh
[ -s "$SSH/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C kscope-test-host -f "$SSH/host_ed25519"
[ -s "$SSH/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C kscope-test-client -f "$SSH/client_ed25519"
cp "$SSH/client_ed25519.pub" "$SSH/authorized_keys"
chmod 644 "$SSH/authorized_keys"
echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$SSH/host_ed25519.pub")" >"$SSH/known_hosts"
cat >"$SSH/sshd_config" <<EOF
# Written by scripts/slurm-up.sh.
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSH/host_ed25519
PidFile $SSH/sshd.pid
AuthorizedKeysFile $SSH/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
# The state directory may sit under /tmp (world-writable), which StrictModes rejects.
StrictModes no
# Sessions find this cluster's configuration, as logins on a real cluster do.
SetEnv SLURM_CONF=$SLURM_CONF
EOF
mkdir -p /run/sshd # sshd's privilege-separation directory
if ! alive "$SSH/sshd.pid" sshd; then
    "$(command -v sshd)" -f "$SSH/sshd_config" -E "$DIR/log/sshd.log"
fi
wait_for 10 sshd bash -c "exec 3<>/dev/tcp/127.0.0.1/$SSH_PORT"

cat >"$DIR/env.sh" <<EOF
export SLURM_CONF=$SLURM_CONF
export KSCOPE_SLURM_SSH_PORT=$SSH_PORT
EOF
cat >"$DIR/env.json" <<EOF
{"slurm_conf": "$SLURM_CONF", "host": "$HOST", "ssh_port": $SSH_PORT,
 "ssh_key": "$SSH/client_ed25519", "known_hosts": "$SSH/known_hosts",
 "host_key_pub": "$SSH/host_ed25519.pub", "sshd_config": "$SSH/sshd_config"}
EOF
echo "slurm-up: SLURM ($HOST) and sshd (127.0.0.1:$SSH_PORT) are up; . $DIR/env.sh"
