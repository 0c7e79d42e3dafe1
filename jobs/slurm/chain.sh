#!/usr/bin/env bash
# Submit the published stage chains as SLURM jobs linked by afterok dependencies, optionally
# after the array jobs that make their shard sets:
#   s0:   stage 0 only             s012: stage 0 -> stage 1 -> stage 2
#   s03:  stage 0 -> stage 3       all:  stage 0 once, then both chains (the default)
#
#   jobs/slurm/chain.sh [s0|s012|s03|all] [--make-shards FILE] SHARD_ROOT RUNS_DIR [tools/train options]
#   jobs/slurm/chain.sh status RUNS_DIR      # state, reason and log of every job submitted
#
# Run from the repository root. SBATCH_ARGS (e.g. "--nodes=2 --gpus-per-node=4
# --ntasks-per-node=4 -p gpu") goes to every training sbatch, SHARDS_SBATCH_ARGS to every
# shard-making sbatch. Each stage trains in RUNS_DIR/<stages so far> (s0, s01, s012, s03)
# and starts from the previous stage's exported weights; a stage whose weights already exist
# is not submitted again. Requeued jobs keep their id, so the dependencies hold across
# preemptions.
#
# --make-shards FILE: one shard-making array job per line, submitted first:
#     STAGES TASKS tools/make_shards arguments (whitespace-separated, no quoting)
#     0   16 static /data/static --out /data/shards/static --clips 4800000
#     23  4  davis /data/DAVIS --out /data/shards/davis/skip5 --max-skip 5 --clips 3820
#   STAGES: the stages (digits) that read the set; their training jobs wait for this array
#   with afterok. A line whose --out already has a manifest.json is not submitted again.
#   `tools/make_shards plan --stage N` prints the sets (and sizes) a stage needs.
#
# Logs: RUNS_DIR/logs/<name>-<job>.out (shard arrays: shards<line>-<job>_<task>.out).
# RUNS_DIR/jobs.tsv records every job submitted (name, job id, log). If a job fails, the
# jobs that wait on it are cancelled (or stay pending with Reason=DependencyNeverSatisfied,
# depending on the cluster's DependencyParameters); `chain.sh status RUNS_DIR` shows which
# job failed, how, and where its log is. Each job id and log is also printed (stderr).
set -euo pipefail

usage() {
  echo "usage: $0 [s0|s012|s03|all] [--make-shards FILE] SHARD_ROOT RUNS_DIR [tools/train options]" >&2
  echo "       $0 status RUNS_DIR" >&2
  exit 2
}

# ------------------------------------------------------------------------- status
# field RECORD NAME: the value of NAME=... in a one-line `scontrol show job -o` record
field() { { grep -o "\b$2=[^ ]*" <<< "$1" || true; } | head -n 1 | cut -d= -f2-; }

status() {
  local runs=$1 name job log records record
  [ -f "$runs/jobs.tsv" ] || { echo "$runs/jobs.tsv: no jobs were submitted from there" >&2; exit 1; }
  while IFS=$'\t' read -r name job log; do
    if ! records=$(scontrol show job -o "$job" 2>/dev/null) || [ -z "$records" ]; then
      # Finished jobs leave slurmctld after MinJobAge; accounting (if any) still knows them.
      records=$(sacct -n -X -P -j "$job" -o JobID,State,ExitCode 2>/dev/null || true)
      echo "$name job $job: ${records:-no longer known to slurmctld (no accounting)}; log $log"
      continue
    fi
    while IFS= read -r record; do
      local id state reason code
      id=$(field "$record" JobId); state=$(field "$record" JobState)
      reason=$(field "$record" Reason); code=$(field "$record" ExitCode)
      local task; task=$(field "$record" ArrayTaskId)
      [ -n "$task" ] && id="${job}_$task"
      local line="$name job $id: $state"
      [ "$reason" != "None" ] && line+=" ($reason)"
      case "$state" in COMPLETED|FAILED|TIMEOUT|CANCELLED|OUT_OF_MEMORY|NODE_FAIL) line+=", exit $code" ;; esac
      echo "$line; log ${log//%a/${task:-0}}"
    done <<< "$records"
  done < "$runs/jobs.tsv"
}

if [ "${1:-}" = status ]; then
  [ $# -eq 2 ] || usage
  status "$2"
  exit 0
fi

# ------------------------------------------------------------------------- submit
CHAIN=all
case "${1:-}" in s0|s012|s03|all) CHAIN=$1; shift ;; esac
SHARD_FILE=""
if [ "${1:-}" = --make-shards ]; then
  [ $# -ge 2 ] || usage
  SHARD_FILE=$2
  shift 2
  [ -f "$SHARD_FILE" ] || { echo "--make-shards $SHARD_FILE: no such file" >&2; exit 2; }
fi
[ $# -ge 2 ] || usage
ROOT=$1 RUNS=$2
shift 2
EXTRA=("$@")
read -r -a SBATCH_EXTRA <<< "${SBATCH_ARGS:-}"
read -r -a SHARDS_EXTRA <<< "${SHARDS_SBATCH_ARGS:-}"
mkdir -p "$RUNS/logs"
RUNS=$(cd "$RUNS" && pwd)
LOGS="$RUNS/logs"

# record NAME JOB LOG: remember a submitted job for `status`, tell the user
record() {
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RUNS/jobs.tsv"
  echo "$1: job $2, log ${3//%a/<task>}" >&2
}

# Shard arrays first; SHARD_JOBS[stage] collects the ids each stage waits for.
declare -A SHARD_JOBS=()
if [ -n "$SHARD_FILE" ]; then
  number=0
  while read -r -a line; do
    [ ${#line[@]} -eq 0 ] && continue
    [[ ${line[0]} == \#* ]] && continue
    number=$((number + 1))
    stages=${line[0]} tasks=${line[1]}
    args=("${line[@]:2}")
    if ! [[ $stages =~ ^[0-3]+$ && $tasks =~ ^[1-9][0-9]*$ ]] || [ ${#args[@]} -lt 2 ]; then
      echo "$SHARD_FILE line $number: expected STAGES TASKS SOURCE_KIND SOURCE ... (e.g. 0 16 static /data/static --out ...)" >&2
      exit 2
    fi
    out=""
    for ((i = 0; i < ${#args[@]} - 1; i++)); do
      [ "${args[i]}" = --out ] && out=${args[i + 1]}
    done
    if [ -n "$out" ] && [ -f "$out/manifest.json" ]; then
      echo "shards $out: already made" >&2
      continue
    fi
    log="$LOGS/shards$number-%A_%a.out"
    job=$(sbatch --parsable --array="0-$((tasks - 1))" --job-name="stcn-shards$number" \
          --output="$log" "${SHARDS_EXTRA[@]}" jobs/slurm/make_shards.sbatch "${args[@]}")
    job=${job%%;*}
    record "shards$number(${args[0]} ${out})" "$job" "${log//%A/$job}"
    for ((i = 0; i < ${#stages}; i++)); do
      s=${stages:i:1}
      SHARD_JOBS[$s]="${SHARD_JOBS[$s]:-}:$job"
    done
  done < "$SHARD_FILE"
fi

# submit RUN_NAME STAGE PREVIOUS_RUN_NAME PREVIOUS_JOB -> prints the job id ("" when done)
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
  local waits="${after:+:$after}${SHARD_JOBS[$number]:-}"
  local dependency=()
  [ -n "$waits" ] && dependency=(--dependency="afterok$waits")
  local job log="$LOGS/$name-%j.out"
  job=$(sbatch --parsable --job-name="stcn-$name" --output="$log" "${SBATCH_EXTRA[@]}" \
        "${dependency[@]}" jobs/slurm/train.sbatch "${args[@]}" "${EXTRA[@]}")
  job=${job%%;*}
  record "stage$number($name)" "$job" "${log//%j/$job}"
  echo "$job"
}

s0=$(submit s0 0 "" "")
if [ "$CHAIN" = s012 ] || [ "$CHAIN" = all ]; then
  s01=$(submit s01 1 s0 "$s0")
  submit s012 2 s01 "$s01" >/dev/null
fi
if [ "$CHAIN" = s03 ] || [ "$CHAIN" = all ]; then
  submit s03 3 s0 "$s0" >/dev/null
fi
echo "follow the jobs with: $0 status $RUNS" >&2
