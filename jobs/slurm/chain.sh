#!/usr/bin/env bash
# Submit the published stage chains as SLURM jobs linked by afterok dependencies:
#   s012: stage 0 -> stage 1 -> stage 2        s03: stage 0 -> stage 3
#   all:  stage 0 once, then both chains (the default)
#
#   jobs/slurm/chain.sh [s012|s03|all] SHARD_ROOT RUNS_DIR [tools/train options for every stage]
#
# Run from the repository root. SBATCH_ARGS (e.g. "--nodes=2 --gpus-per-node=4 -p gpu") is
# passed to every sbatch. Each stage trains in RUNS_DIR/<stages so far> (s0, s01, s012, s03)
# and starts from the previous stage's exported weights; a stage whose weights already exist
# is not submitted again. Requeued jobs keep their id, so the dependencies hold across
# preemptions. Prints the job ids.
set -euo pipefail

CHAIN=all
case "${1:-}" in s012|s03|all) CHAIN=$1; shift ;; esac
if [ $# -lt 2 ]; then
  echo "usage: $0 [s012|s03|all] SHARD_ROOT RUNS_DIR [tools/train options]" >&2
  exit 2
fi
ROOT=$1 RUNS=$2
shift 2
EXTRA=("$@")
read -r -a SBATCH_EXTRA <<< "${SBATCH_ARGS:-}"

# submit RUN_NAME STAGE PREVIOUS_RUN_NAME DEPENDENCY_JOB -> prints the job id ("" when done)
submit() {
  local name=$1 number=$2 previous=$3 after=$4
  if [ -f "$RUNS/$name/stcn_stage$number.pth" ]; then
    echo "stage $number in $RUNS/$name: already done" >&2
    return 0
  fi
  local args=(--stage "$number" --shards "$ROOT" --run-dir "$RUNS/$name")
  if [ -n "$previous" ]; then
    args+=(--load-network "$RUNS/$previous/stcn_stage${previous: -1}.pth")
  fi
  local dependency=()
  if [ -n "$after" ]; then
    dependency=(--dependency="afterok:$after")
  fi
  local job
  job=$(sbatch --parsable --job-name="stcn-$name" "${SBATCH_EXTRA[@]}" "${dependency[@]}" \
        jobs/slurm/train.sbatch "${args[@]}" "${EXTRA[@]}")
  echo "stage $number in $RUNS/$name: job ${job%%;*}" >&2
  echo "${job%%;*}"
}

mkdir -p "$RUNS"
s0=$(submit s0 0 "" "")
if [ "$CHAIN" != s03 ]; then
  s01=$(submit s01 1 s0 "$s0")
  submit s012 2 s01 "$s01" >/dev/null
fi
if [ "$CHAIN" != s012 ]; then
  submit s03 3 s0 "$s0" >/dev/null
fi
