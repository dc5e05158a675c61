#!/bin/bash
# A one-node SLURM cluster on 127.0.0.1 (munged, slurmctld, slurmd started by hand; no systemd), to submit
# scripts/ablation.sbatch exactly as a user would. Debian or Ubuntu, as root, after
#   apt-get install slurm-wlm munge
#   bash scripts/slurm_localhost.sh start    # writes /etc/slurm/slurm.conf and a munge key, starts the daemons
#   bash scripts/slurm_localhost.sh demo     # a 2-task array of a tiny protocol from this checkout, then its table
#   bash scripts/slurm_localhost.sh stop
# The node is this machine (its cores and memory); one partition, "cpu", no GPU. `stop` ends only the daemons
# that `start` started (their pids are kept in /run/slurm_localhost/), never another cluster's on this host; a
# daemon that was already running is used as it is and left running.
# Submit with scripts/submit_ablation.sh: this cluster, like slurm-wlm's default, accepts a request no node can
# meet and leaves it pending (Reason=PartitionConfig); the helper says so in one line instead.
set -euo pipefail
cd "$(dirname "$0")/.."

start() {
  mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge /etc/slurm /var/spool/slurmd /var/spool/slurmctld \
    /var/log/slurm
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/slurm_localhost
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- munged && sleep 1 && cp /run/munge/munged.pid /run/slurm_localhost/munged.pid
  fi
  local mem
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))   # MiB, less 1 GiB for the system
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=localhost
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  # each daemon writes its pid file (slurm.conf above); keep a copy of those we start, and only those
  pgrep -x slurmctld >/dev/null || { slurmctld && sleep 1 && cp /run/slurmctld.pid /run/slurm_localhost/; }
  pgrep -x slurmd >/dev/null || { slurmd && sleep 1 && cp /run/slurmd.pid /run/slurm_localhost/; }
  for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1; done
  sinfo
}

demo() {
  # Unedited script; only the documented variables and overrides: this node has few cores and no GPU.
  local out=runs/slurm-demo
  rm -rf "$out"
  export ABLATION_TASKS=2 VENV="${VENV:-.venv}" \
    PROTOCOL="--datasets synthetic --shots 1 --seeds 0 1 --modes deviation --out $out" \
    TRAIN_ARGS="--random-init --clip ViT-B-16 --views 4 --steps 12 --eta-warmup 4 --log-every 4"
  job=$(sbatch --parsable --array=1-2 --cpus-per-task=1 --mem=4G --time=00:30:00 scripts/ablation.sbatch)
  echo "submitted array job $job"
  while squeue -h -j "$job" 2>/dev/null | grep -q .; do sleep 5; done
  sacct -j "$job" 2>/dev/null || true
  for f in ablation-"${job}"_*.out; do echo "== $f"; tail -n 3 "$f"; done
  source "$VENV/bin/activate"
  echo "report of every task:"
  # shellcheck disable=SC2086
  python -m baselines.ablation $PROTOCOL --report-only
}

stop() {
  local f pid
  for f in /run/slurm_localhost/slurmd.pid /run/slurm_localhost/slurmctld.pid /run/slurm_localhost/munged.pid; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    # the pid is ours only while it still runs the daemon we started (a pid may be reused after a reboot)
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$f" .pid)" ]; then kill "$pid"; fi
    rm -f "$f"
  done
}

"${1:?usage: slurm_localhost.sh start|demo|stop}"
