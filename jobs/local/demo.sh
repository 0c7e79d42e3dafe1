#!/usr/bin/env bash
# The demo: one command from synthetic data to a trained, evaluated STCN.
#
#   jobs/local/demo.sh [OUT_DIR]          (default OUT_DIR: demo_out)
#   DEMO_SCALE=mini jobs/local/demo.sh    (the miniature run the test suite uses)
#
# Every step is a real tool with a smaller config: tools/make_synthetic -> tools/make_shards
# -> tools/train (stage 0, then stage 3 from stage 0's weights) -> tools/eval. The sizes of
# each scale live in jobs/local/demo/<scale>.env, and the shortened stage schedules in
# jobs/local/demo/stage{0,3}.yaml. Running it again reuses finished steps: generated sets,
# finished shard sets, finished training stages and finished evaluations.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:-demo_out}
SCALE=${DEMO_SCALE:-full}
CONFIG=jobs/local/demo/$SCALE.env
[ -f "$CONFIG" ] || { echo "demo: no scale '$SCALE' ($CONFIG missing)" >&2; exit 2; }
# shellcheck source=jobs/local/demo/full.env
source "$CONFIG"

DATA=$OUT/data SHARDS=$OUT/shards RUNS=$OUT/runs EVALS=$OUT/eval
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# --- progress: which step runs, and how long is left ----------------------------------
# Each step's expected seconds on a 2-core CPU (from the scale's config); the estimate of
# what is left is rescaled by how fast the finished steps actually went on this machine.
STEP_NAMES=("generate synthetic sets" "make shards" "train stage 0" "train stage 3"
            "evaluate untrained network" "evaluate trained network" "copy-first-frame baseline")
STEP_SECONDS=("$T_DATA" "$T_SHARDS" "$T_STAGE0" "$T_STAGE3" "$T_EVAL" "$T_EVAL" "$T_BASELINE")
START=$(date +%s) STEP=0 EXPECTED_DONE=0

mmss() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }
step() {
  local now elapsed left=0 i
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
  [ -f "$DATA/$kind/SYNTHETIC.json" ] && { echo "$DATA/$kind: already generated"; return; }
  tools/make_synthetic "$kind" "$DATA/$kind" --videos "$VIDEOS" --size "$size" --seed 0 --overwrite \
    "${frames[@]}"
}

# shards KIND OUT [options]: make a shard set once (a finished set has its manifest.json)
shards() {
  local kind=$1 out=$2
  shift 2
  [ -f "$out/manifest.json" ] && { echo "$out: already made"; return; }
  tools/make_shards "$kind" "$DATA/$kind" --out "$out" --clips-per-shard "$CLIPS_PER_SHARD" \
    --workers "$WORKERS" "$@"
}

# evaluate NAME [tools/eval davis options]: held-out synthetic DAVIS 2017 val
evaluate() {
  local name=$1
  shift
  tools/eval davis --root "$DATA/davis" --year 2017 --split val --device "$DEVICE" \
    --out "$EVALS/$name" "$@"
}

step
synthetic static "$STATIC_SIZE"
synthetic davis "$VIDEO_SIZE"
synthetic youtube "$VIDEO_SIZE"

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
  tools/train --stage 0 --run-dir "$RUNS/s0" --config jobs/local/demo/stage0.yaml \
    --iterations "$ITERS_STAGE0" --from-scratch "${TRAIN[@]}"
else
  echo "$RUNS/s0: stage 0 already trained"
fi

step
if [ ! -f "$RUNS/s03/stcn_stage3.pth" ]; then
  tools/train --stage 3 --run-dir "$RUNS/s03" --config jobs/local/demo/stage3.yaml \
    --iterations "$ITERS_STAGE3" --load-network "$RUNS/s0/stcn_stage0.pth" "${TRAIN[@]}"
else
  echo "$RUNS/s03: stage 3 already trained"
fi

step
evaluate untrained
step
evaluate trained --model "$RUNS/s03/stcn_stage3.pth"
step
tools/eval baseline --root "$DATA/davis" --year 2017 --split val --out "$EVALS/copy_first_frame"

# --- summary ---------------------------------------------------------------------------
python3 - "$EVALS" "$SHARDS" "$RUNS" "$(($(date +%s) - START))" "$REQUIRE_LEARNING" <<'EOF'
import json, sys
from pathlib import Path

evals, shards, runs, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
require_learning = sys.argv[5] == "1"  # the mini scale trains too briefly to learn
result = {name: json.loads((evals / name / "results.json").read_text())
          for name in ("untrained", "trained", "copy_first_frame")}
jf = {name: r["scores"]["J&F"] for name, r in result.items()}
print("\n" + "=" * 72)
print(f"STCN demo finished in {seconds // 60}:{seconds % 60:02d}")
print(f"  held-out synthetic DAVIS 2017 val, J&F (%):")
print(f"    trained (stage 0 -> 3)      {jf['trained']:6.1f}")
print(f"    untrained (random weights)  {jf['untrained']:6.1f}")
print(f"    copy the first-frame mask   {jf['copy_first_frame']:6.1f}")
print(f"  inference speed (trained):    {result['trained']['fps']:.1f} FPS amortised, file IO excluded")
print(f"  shard sets:                   {shards}")
print(f"  run directories:              {runs}/s0  {runs}/s03")
print(f"  masks and scores:             {evals}/trained")
print(f"  TensorBoard:                  tensorboard --logdir {runs}")
print("=" * 72)
if require_learning and jf["trained"] <= jf["untrained"]:
    sys.exit("demo: the trained network did not beat the untrained one")
EOF
