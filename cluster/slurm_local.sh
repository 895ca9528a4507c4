#!/bin/bash
# A real one-node SLURM (Debian slurm-wlm 22.05: slurmctld + slurmd + munge) on localhost,
# for tests of cluster/fastcls.sbatch. Needs root; installs slurm-wlm + munge with apt when
# slurmctld is missing (CI: a clean Debian runner).
#
#   bash cluster/slurm_local.sh start STATE_DIR   # prints "ready" once the node is idle
#   bash cluster/slurm_local.sh stop STATE_DIR    # kills the daemons it started (pid files)
#
# Notes (seen on 22.05): no cgroup.conf (22.05 cannot disable the cgroup plugin; linuxproc
# tracking + task/none + no accounting need no cgroups). A requeued job is held ~120 s
# (its EligibleTime); `scontrol update JobId=ID StartTime=now` releases it. Requeue
# truncates the job's output file unless the script sets #SBATCH --open-mode=append.
set -euo pipefail
CMD=${1:?usage: slurm_local.sh start|stop STATE_DIR}
S=${2:?usage: slurm_local.sh start|stop STATE_DIR}
if [[ $CMD == stop ]]; then
    for f in "$S"/ctld.pid "$S"/d.pid; do [[ -f $f ]] && kill "$(cat "$f")" 2> /dev/null || true; done
    exit 0
fi
[[ $(id -u) == 0 ]] || { echo "slurm_local.sh: needs root" >&2; exit 1; }
mkdir -p "$S"/{spool,state,log} /run/munge /var/log/munge /etc/munge /etc/slurm /var/lib/munge
if ! command -v slurmctld > /dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge > /dev/null
fi
[[ -f /etc/munge/munge.key ]] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2> /dev/null
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged > /dev/null || su -s /bin/sh munge -c /usr/sbin/munged
H=$(hostname -s); CPUS=$(nproc); MEM=$(( $(free -m | awk '/Mem/{print $2}') - 1024 ))
rm -f /etc/slurm/cgroup.conf
cat > /etc/slurm/slurm.conf <<EOC
ClusterName=local
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldLogFile=$S/log/ctld.log
SlurmdLogFile=$S/log/d.log
SlurmctldPidFile=$S/ctld.pid
SlurmdPidFile=$S/d.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
MinJobAge=600
NodeName=$H CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=main Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOC
/usr/sbin/slurmctld
/usr/sbin/slurmd
for _ in $(seq 60); do
    sinfo -h -o %T 2> /dev/null | grep -qE '^(idle|mixed|allocated)' && { echo ready; exit 0; }
    sleep 1
done
echo "slurm_local.sh: node not idle after 60 s; logs in $S/log" >&2
sinfo >&2 || true
exit 1
