#!/usr/bin/env bash
# A real single-node Slurm (Debian's slurm-wlm, with slurmdbd accounting on MariaDB, munge auth), started and
# stopped without systemd: `.ci/slurm.sh start` (installs the packages first when missing; root) and
# `.ci/slurm.sh stop` (kills the daemons by the PIDs it saved). The partition `debug` holds this machine with its
# CPUs and memory as `slurmd -C` reports them. tests/test_slurm.py runs sweeps against it.
set -euo pipefail
STATE=${BENCH_SLURM_STATE:-/tmp/bench-slurm}
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

start() {
    if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
    fi
    mkdir -p "$STATE" /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/mysqld
    local host node mem cpus
    host=$(hostname -s)
    node=$(slurmd -C | head -1)
    cpus=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$node")
    mem=$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$node")
    mem=$((mem - 512))  # RealMemory must not exceed what slurmd -C reports; leave the daemons some room

    # munge: one key, the daemon as root (no systemd, no munge user session needed)
    [ -s /etc/munge/munge.key ] || (dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null)
    chown -R root:root /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    munged --force --pid-file "$STATE/munged.pid" || true

    # MariaDB for slurmdbd
    chown -R mysql:mysql /run/mysqld /var/lib/mysql
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mariadbd.pid --skip-networking=0 --bind-address=127.0.0.1 >"$STATE/mariadbd.log" 2>&1 &
    for _ in $(seq 60); do mariadb -e "select 1" >/dev/null 2>&1 && break; sleep 0.5; done
    mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
    cat >/etc/slurm/slurm.conf <<EOF
ClusterName=bench
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=60 State=UP
EOF
    # slurmd 22.05 without a mounted cgroup filesystem starts only with the v1 plugin named here
    echo "CgroupPlugin=cgroup/v1" >/etc/slurm/cgroup.conf

    slurmdbd
    for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
    sacctmgr -i add cluster bench >/dev/null 2>&1 || true
    slurmctld
    slurmd
    for _ in $(seq 60); do sinfo -h -o "%T" 2>/dev/null | grep -q idle && break; sleep 0.5; done
    sinfo
}

stop() {
    for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
        local pidfile="$STATE/$daemon.pid"
        [ "$daemon" = mariadbd ] && pidfile=/run/mysqld/mariadbd.pid  # written by the mysql user
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
