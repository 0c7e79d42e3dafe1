#!/usr/bin/env bash
# Train one STCN stage on this machine: one torchrun process per GPU (one CPU process without GPUs).
#
#   jobs/local/train.sh --stage 0 --shards /data/shards --run-dir runs/s0 [tools/train options]
#
# GPUS=N overrides the GPU count (default: all GPUs nvidia-smi lists). Every option is passed
# to tools/train (see `tools/train --help`); --resume auto is its default, so running the same
# command again continues an interrupted run. Exit status is tools/train's (75: checkpointed
# on SIGTERM/SIGUSR1, run again to continue).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -z "${GPUS:-}" ]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "${GPUS:-0}" -lt 1 ]; then
  GPUS=1
fi

if [ "$GPUS" -eq 1 ] && [ -z "${FORCE_TORCHRUN:-}" ]; then
  # One process needs no rendezvous; exec keeps tools/train's exit status and signals.
  exec python3 tools/train "$@"
fi
exec torchrun --standalone --nproc-per-node "$GPUS" tools/train "$@"
