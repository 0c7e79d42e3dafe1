#!/usr/bin/env bash
# Run the published stage chains on this machine, one stage after another:
#   s012: stage 0 -> stage 1 -> stage 2        s03: stage 0 -> stage 3
#   all:  stage 0 once, then both chains (the default)
#
#   jobs/local/chain.sh [s012|s03|all] SHARD_ROOT RUNS_DIR [tools/train options for every stage]
#
# Each stage trains in RUNS_DIR/<stages so far> (s0, s01, s012, s03) and starts from the
# previous stage's exported weights. A stage that already finished is skipped (its weights
# exist), an interrupted one resumes, so the same command can simply be run again.
set -euo pipefail
cd "$(dirname "$0")/../.."

CHAIN=all
case "${1:-}" in s012|s03|all) CHAIN=$1; shift ;; esac
if [ $# -lt 2 ]; then
  echo "usage: $0 [s012|s03|all] SHARD_ROOT RUNS_DIR [tools/train options]" >&2
  exit 2
fi
ROOT=$1 RUNS=$2
shift 2

# stage RUN_NAME STAGE [PREVIOUS_RUN_NAME]
stage() {
  local name=$1 number=$2 previous=${3:-}
  if [ -f "$RUNS/$name/stcn_stage$number.pth" ]; then
    echo "stage $number in $RUNS/$name: already done" >&2
    return 0
  fi
  local load=()
  if [ -n "$previous" ]; then
    load=(--load-network "$RUNS/$previous/stcn_stage${previous: -1}.pth")
  fi
  jobs/local/train.sh --stage "$number" --shards "$ROOT" --run-dir "$RUNS/$name" "${load[@]}" "${EXTRA[@]}"
}

EXTRA=("$@")
stage s0 0
if [ "$CHAIN" != s03 ]; then
  stage s01 1 s0
  stage s012 2 s01
fi
if [ "$CHAIN" != s012 ]; then
  stage s03 3 s0
fi
