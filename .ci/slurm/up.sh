#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (Debian, as root): munge, slurmctld, slurmd,
# configured from .ci/slurm/slurm.conf.in. Idempotent: a cluster already up with this config is
# left alone; a changed config restarts the daemons. Ends when the node accepts jobs (sinfo: idle).
#   bash .ci/slurm/up.sh            # about a minute the first time (apt), seconds after
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: one key per machine (the package makes it); the daemon authenticates every SLURM call
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi

# slurm.conf: this host's name, CPUs and memory, as slurmd sees them
node="$(slurmd -C | head -n 1)"  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
host="${node#NodeName=}"
host="${host%% *}"
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
conf="$(sed -e "s/@HOST@/$host/g" -e "s/@NODE@/$node/" "$here/slurm.conf.in")"
changed=0
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" >/etc/slurm/slurm.conf
    changed=1
fi
if ! cmp -s "$here/cgroup.conf" /etc/slurm/cgroup.conf; then
    cp "$here/cgroup.conf" /etc/slurm/cgroup.conf
    changed=1
fi

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # the daemon whose pid file is $1
    if running "$1"; then
        kill "$(cat "$1")"
        for _ in $(seq 40); do running "$1" || break; sleep 0.25; done
    fi
}
if [ "$changed" = 1 ]; then stop /run/slurmd.pid; stop /run/slurmctld.pid; fi
failed() {  # the daemon's own words, for the CI log
    echo "slurm: $1 did not start; the end of /var/log/slurm/$1.log:" >&2
    tail -n 15 "/var/log/slurm/$1.log" >&2 || true
    exit 1
}
running /run/slurmctld.pid || slurmctld || failed slurmctld
running /run/slurmd.pid || slurmd || failed slurmd

# ready: the controller answers and the node is idle (or already running jobs)
for _ in $(seq 120); do
    state="$(sinfo -h -n "$host" -o %T 2>/dev/null || true)"
    case "$state" in
        idle*|mixed*|allocated*|completing*) echo "slurm: node $host $state"; exit 0 ;;
        down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
echo "slurm: node $host not ready after 60 s (state: ${state:-none})" >&2
tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
