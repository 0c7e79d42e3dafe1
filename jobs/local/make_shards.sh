#!/usr/bin/env bash
# Make one shard set on this machine with every core, then make sure manifest.json exists.
#
#   jobs/local/make_shards.sh davis data/DAVIS --out shards/davis/skip5 --max-skip 5 --clips 38258
#   TASKS=3 TASK=1 jobs/local/make_shards.sh ...   # share the work with other machines
#
# The arguments go to tools/make_shards (`tools/make_shards SOURCE --help`). Rerunning the
# same command after an interruption resumes: finished shards are kept, the rest is redone.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
tools/make_shards "$@" --workers "${WORKERS:-$(nproc)}" \
  --task-index "${TASK:-0}" --num-tasks "${TASKS:-1}"
