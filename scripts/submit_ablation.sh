#!/bin/bash
# sbatch scripts/ablation.sbatch, once some node of the partition can hold the request (CPUs per task, memory).
# A request that no node meets is refused at submission only where the cluster sets EnforcePartLimits; elsewhere
# (slurm-wlm's default, and scripts/slurm_localhost.sh's cluster) SLURM accepts it and the job pends forever
# (squeue: Reason=PartitionConfig). This says so before submitting, in one line, and submits nothing.
#   bash scripts/submit_ablation.sh [sbatch options]          e.g. --cpus-per-task=1 --mem=4G --array=1-2
# The exported variables of ablation.sbatch (ABLATION_TASKS, PROTOCOL, TRAIN_ARGS, VENV) pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

cpus=$(sed -n 's/^#SBATCH --cpus-per-task=//p' scripts/ablation.sbatch)
mem=$(sed -n 's/^#SBATCH --mem=//p' scripts/ablation.sbatch)
partition=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a=${args[$i]}
  next=${args[$((i + 1))]:-}
  case $a in
    --cpus-per-task=*) cpus=${a#*=} ;;
    -c) cpus=$next ;;
    --mem=*) mem=${a#*=} ;;
    --partition=*) partition=${a#*=} ;;
    -p) partition=$next ;;
  esac
done

mib() {  # SLURM's memory sizes (default unit M) in MiB
  local n=${1%[KkMmGgTt]}
  case $1 in
    *[Tt]) echo $((n * 1048576)) ;;
    *[Gg]) echo $((n * 1024)) ;;
    *[Kk]) echo $((n / 1024)) ;;
    *) echo "$n" ;;
  esac
}

nodes=$(sinfo -h -N ${partition:+-p "$partition"} -o '%N %c %m' | sort -u)
if ! awk -v c="$cpus" -v m="$(mib "$mem")" '$2 >= c && $3 + 0 >= m {ok = 1} END {exit !ok}' <<<"$nodes"; then
  echo "error: no node${partition:+ of partition $partition} has $cpus CPUs and ${mem} of memory for one task" \
       "(sinfo: $(awk '{printf "%s%s %s CPUs %s MiB", sep, $1, $2, $3; sep = "; "}' <<<"$nodes")); SLURM would" \
       "accept the job and leave it pending (Reason=PartitionConfig): pass a smaller --cpus-per-task/--mem" >&2
  exit 2
fi
exec sbatch "$@" scripts/ablation.sbatch
