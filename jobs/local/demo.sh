#!/usr/bin/env bash
# The demo: one command from synthetic data to a trained, evaluated STCN.
#
#   jobs/local/demo.sh [OUT_DIR]          (default OUT_DIR: demo_out)
#   DEMO_SCALE=mini jobs/local/demo.sh    (the miniature run the test suite uses)
#
# Every step is a real tool with a smaller config: tools/make_synthetic -> tools/make_shards
# -> tools/train (stage 0, then stage 3 from stage 0's weights) -> tools/eval ->
# tools/demo_report (OUT_DIR/report/index.html). The sizes of each scale live in
# jobs/local/demo/<scale>.env (default scale: gpu with CUDA, else cpu), and the shortened
# stage schedules in jobs/local/demo/stage{0,3}.yaml. Running it again reuses finished
# steps: generated sets, finished shard sets, training stages and evaluations.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:-demo_out}
SCALE=${DEMO_SCALE:-auto}
if [ "$SCALE" = auto ]; then
  # The GPU scale needs a CUDA build of torch that sees a GPU; anything else runs the CPU scale.
  if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    SCALE=gpu
  else
    SCALE=cpu
  fi
fi
CONFIG=jobs/local/demo/$SCALE.env
[ -f "$CONFIG" ] || { echo "demo: no scale '$SCALE' ($CONFIG missing)" >&2; exit 2; }
# shellcheck source=jobs/local/demo/cpu.env
source "$CONFIG"

DATA=$OUT/data SHARDS=$OUT/shards RUNS=$OUT/runs EVALS=$OUT/eval
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# --- progress: which step runs, and how long is left ----------------------------------
# Each step's expected seconds on a 2-core CPU (from the scale's config); the estimate of
# what is left is rescaled by how fast the finished steps actually went on this machine.
STEP_NAMES=("generate synthetic sets" "make shards" "train stage 0" "train stage 3"
            "evaluate untrained network" "evaluate trained network" "copy-first-frame baseline"
            "report")
STEP_SECONDS=("$T_DATA" "$T_SHARDS" "$T_STAGE0" "$T_STAGE3" "$T_EVAL" "$T_EVAL" "$T_BASELINE" "$T_REPORT")
START=$(date +%s) STEP=0 EXPECTED_DONE=0
STEP_START=$START STEP_CPU=0 STEP_HOW=reused
: > "$OUT/steps.tsv"  # one line per finished step: name, wall s, CPU s, run or reused

mmss() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }
# CPU_NOW: CPU seconds (user + system) of every finished child process of this shell so far.
# Call it directly, never in $(...): `times` in a subshell reports the subshell's children.
cpu_now() {
  times > "$OUT/.times"
  CPU_NOW=$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); t += p[1] * 60 + p[2] } printf "%.1f", t }' "$OUT/.times")
}
# end the running step: print and record its wall and CPU time
end_step() {
  local now cpu
  cpu_now
  now=$(date +%s) cpu=$(awk -v a="$CPU_NOW" -v b="$STEP_CPU" 'BEGIN { printf "%.1f", a - b }')
  if [ "$STEP" -gt 0 ]; then
    printf '    done in %s (%s CPU seconds)\n' "$(mmss $((now - STEP_START)))" "$cpu"
    printf '%s\t%d\t%s\t%s\n' "${STEP_NAMES[STEP - 1]}" $((now - STEP_START)) "$cpu" "$STEP_HOW" >> "$OUT/steps.tsv"
  fi
  STEP_START=$now STEP_CPU=$CPU_NOW STEP_HOW=reused
}
ran() { STEP_HOW=run; }  # a step that calls no tool (all reused) stays "reused"
step() {
  local now elapsed left=0 i
  end_step
  now=$(date +%s) elapsed=$((now - START))
  for ((i = STEP; i < ${#STEP_SECONDS[@]}; i++)); do left=$((left + STEP_SECONDS[i])); done
  # Rescale by this machine's speed so far, clamped: steps reused from an earlier run
  # take no time and must not make the estimate collapse to zero.
  if [ "$EXPECTED_DONE" -gt 0 ] && [ "$elapsed" -gt 0 ]; then
    local percent=$((100 * elapsed / EXPECTED_DONE))
    percent=$((percent < 50 ? 50 : percent > 400 ? 400 : percent))
    left=$((left * percent / 100))
  fi
  printf '\n\033[1m[%d/%d] %s\033[0m   (elapsed %s, about %s left)\n' \
    $((STEP + 1)) ${#STEP_NAMES[@]} "${STEP_NAMES[STEP]}" "$(mmss "$elapsed")" "$(mmss "$left")"
  EXPECTED_DONE=$((EXPECTED_DONE + STEP_SECONDS[STEP]))
  STEP=$((STEP + 1))
}

# synthetic KIND: generate the set once (a finished set has its SYNTHETIC.json)
synthetic() {
  local kind=$1 size=$2 frames=()
  # DAVIS val is the held-out evaluation set: its length sets the evaluation time
  if [ "$kind" = davis ]; then frames=(--frames "$DAVIS_FRAMES"); fi
  # the videos' motion (static images have none): how far objects drift from frame 0; their
  # count and size: objects must stay several pixels of the network's stride-16 features
  # wide once clips are shrunk to CROP x CROP
  if [ "$kind" != static ]; then
    frames+=(--speed "$SPEED" --objects "$OBJECTS" --object-scale "$OBJECT_SCALE")
  fi
  [ -f "$DATA/$kind/SYNTHETIC.json" ] && { echo "$DATA/$kind: already generated"; return; }
  ran
  tools/make_synthetic "$kind" "$DATA/$kind" --videos "$VIDEOS" --size "$size" --seed 0 --overwrite \
    "${frames[@]}"
}

# heldout: the videos every evaluation scores, a synthetic DAVIS set of its own (seed 1: none
# of its videos is in training) whose 2017 val split holds $HELDOUT_VIDEOS videos drawn like
# the training ones; its train and test-dev splits are never read.
heldout() {
  [ -f "$DATA/heldout/SYNTHETIC.json" ] && { echo "$DATA/heldout: already generated"; return; }
  ran
  tools/make_synthetic davis "$DATA/heldout" --videos "$((3 * HELDOUT_VIDEOS))" --size "$VIDEO_SIZE" \
    --seed 1 --overwrite --frames "$DAVIS_FRAMES" --speed "$SPEED" --objects "$OBJECTS" \
    --object-scale "$OBJECT_SCALE"
}

# shards KIND OUT [options]: make a shard set once (a finished set has its manifest.json)
shards() {
  local kind=$1 out=$2
  shift 2
  [ -f "$out/manifest.json" ] && { echo "$out: already made"; return; }
  ran
  tools/make_shards "$kind" "$DATA/$kind" --out "$out" --clips-per-shard "$CLIPS_PER_SHARD" \
    --workers "$WORKERS" "$@"
}

# evaluate NAME [tools/eval davis options]: the held-out videos (2017 val of $DATA/heldout)
evaluate() {
  local name=$1
  shift
  ran
  tools/eval davis --root "$DATA/heldout" --year 2017 --split val --device "$DEVICE" \
    --out "$EVALS/$name" "$@"
}

step
synthetic static "$STATIC_SIZE"
synthetic davis "$VIDEO_SIZE"
synthetic youtube "$VIDEO_SIZE"
heldout

step
shards static "$SHARDS/static" --clips "$STATIC_CLIPS"
# --subset all: the synthetic sets do not hold the videos of the published train lists.
# DAVIS x5 as published: both synthetic sets have $VIDEOS videos, so DAVIS gets 5x the clips
# (the trainer streams each clip of a phase once and mixes the sets by their sizes).
for skip in 5 10 15 20 25; do
  shards davis "$SHARDS/davis/skip$skip" --clips "$((5 * VIDEO_CLIPS))" --max-skip "$skip" --subset all
  shards youtube "$SHARDS/youtube/skip$skip" --clips "$VIDEO_CLIPS" --max-skip "$skip" --subset all
done

# --allow-repeats: the demo's sets are far smaller than its runs stream (each clip is reused);
# --from-scratch (stage 0): no ImageNet files offline, so stage 0 starts from random weights.
TRAIN=(--shards "$SHARDS" --device "$DEVICE" --crop "$CROP" --crop-mode resize --allow-repeats
       --workers "$TRAIN_WORKERS" --batch-size "$BATCH" --log-every "$LOG_EVERY" --image-every "$IMAGE_EVERY"
       --checkpoint-every "$CHECKPOINT_EVERY" --keep-last 1 --snapshot-every 0 --resume auto)
step
if [ ! -f "$RUNS/s0/stcn_stage0.pth" ]; then
  ran
  tools/train --stage 0 --run-dir "$RUNS/s0" --config jobs/local/demo/stage0.yaml \
    --iterations "$ITERS_STAGE0" --from-scratch "${TRAIN[@]}"
else
  echo "$RUNS/s0: stage 0 already trained"
fi

step
if [ ! -f "$RUNS/s03/stcn_stage3.pth" ]; then
  ran
  tools/train --stage 3 --run-dir "$RUNS/s03" --config jobs/local/demo/stage3.yaml \
    --iterations "$ITERS_STAGE3" --load-network "$RUNS/s0/stcn_stage0.pth" "${TRAIN[@]}"
else
  echo "$RUNS/s03: stage 3 already trained"
fi

# The three evaluations score the same held-out videos at their own (small) resolution.
step
evaluate untrained
step
evaluate trained --model "$RUNS/s03/stcn_stage3.pth"
step
ran
tools/eval baseline --root "$DATA/heldout" --year 2017 --split val --out "$EVALS/copy_first_frame"

# --- report and summary: tools/demo_report (stcn/evaluation/report.py) ------------------
# It reads steps.tsv and adds its own time as the last step.
step
ran
REPORT=(tools/demo_report "$OUT" --step-started "$STEP_START")
if [ "$REQUIRE_LEARNING" = 1 ]; then REPORT+=(--require-learning); fi
exec "${REPORT[@]}"
