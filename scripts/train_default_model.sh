#!/usr/bin/env bash
# Build the ShapeWorld default model from nothing on a 2-core CPU, stage by stage.
#   bash scripts/train_default_model.sh [train.py overrides ...]            # the shipped model's recipe (v2)
#   RECIPE=v1 bash scripts/train_default_model.sh [train.py overrides ...]  # the first model (configs/model/shapeworld.yaml)
# Stages (seeds: data 7, encoder pretraining 1000, training 3407; the demo and the CI check use other seeds):
#   1. ShapeWorld-Ref GRES train/val data into data/shapeworld_train (skipped when it is there, made by this
#      generator with these settings; other data there is an error)
#   2. pretrain the small SAM (promptable segmentation), 3. pretrain the small CLIP (region-caption contrast)
#      (v2: 2 and 3 side by side, one thread each)
#   4. train SSP-SAM (configs/experiment/shapeworld_v2.yaml: SAM frozen, CLIP's text tower trained with it;
#      v1: shapeworld_default.yaml, both encoders frozen)
#   5. ship the best checkpoint, its encoders embedded (scripts/embed_encoders.py), as checkpoints/shapeworld_default
# Times on this 2-core machine: docs/shapeworld_model.md, "How it was made".
# Every stage can be stopped and continued: rerun the script and finished stages are skipped (a
# pretraining is finished when its weights and their report "{out}.json" exist for the same config, the
# report names the weights' sha256 and the weights load; see docs/pretraining.md, "Stages"), an interrupted pretraining resumes exactly
# from its last saved state, SSP-SAM training from its last finished epoch; a stage left half-done
# with other settings is refused, naming them, never continued with the new ones. STAGE_MINUTES=N (default
# 55) stops a pretraining after N minutes, and SSP-SAM training before an epoch that would end past N
# minutes (train.max_minutes); the state is saved and the script exits with status 3: rerun it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
python="${SSP_SAM_VENV:-$repo/.venv}/bin/python"
minutes="${STAGE_MINUTES:-55}"

case "${RECIPE:-v2}" in
  v1) clip_config=pretrain_clip; sam_config=pretrain_sam; experiment=shapeworld_default; run_name=shapeworld_default; side_by_side=0 ;;
  v2) clip_config=pretrain_clip_v2; sam_config=pretrain_sam_v2; experiment=shapeworld_v2; run_name=shapeworld_default_v2; side_by_side=1 ;;
  *) echo "error: RECIPE must be v1 or v2, got '${RECIPE}'" >&2; exit 2 ;;
esac

# Skipped when data/shapeworld_train already holds exactly this data set; data of another generator
# version, seed or size there stops the recipe with a message naming it (never trained on instead).
"$python" scripts/make_shapeworld.py task=gres out=data/shapeworld_train n_images='{train: 3000, val: 100, test: 200}' seed=7 skip_existing=true
# Every stage (the pretrainings, then the SSP-SAM training) runs as a background job that the script waits
# for: bash runs a trap only after a foreground command ends, but interrupts `wait` at once. So Ctrl-C or
# a TERM to the script ends the running stages (each keeps its last saved state: rerun to continue) and
# the script, with status 130 / 143, instead of going on after them (or, without a trap, leaving a stage
# running with no script around it). A non-interactive shell starts background jobs with SIGINT ignored:
# the trap sends them TERM.
stage_pids=()
stop_stages() {
  trap - INT TERM
  kill "${stage_pids[@]}" 2>/dev/null || true
  wait
  echo "stopped: the running stages were ended (their states are kept); rerun this script to continue" >&2
  exit "$1"
}
trap 'stop_stages 130' INT
trap 'stop_stages 143' TERM
if [ "$side_by_side" = 1 ]; then
  # Both pretraining configs use threads=1, so the two stages share the two cores side by side (about
  # 90 min on this machine instead of 145 one after the other). The SAM's progress goes to a log file,
  # the CLIP's to the terminal.
  mkdir -p runs/logs
  sam_log="runs/logs/$sam_config.log"
  echo "SAM pretraining runs beside the CLIP's; its progress: $sam_log"
  "$python" scripts/pretrain_sam.py --config-name "$sam_config" resume=true max_minutes="$minutes" >"$sam_log" 2>&1 &
  sam_pid=$!
  "$python" scripts/pretrain_clip.py --config-name "$clip_config" resume=true max_minutes="$minutes" &
  clip_pid=$!
  stage_pids=("$sam_pid" "$clip_pid")
  clip_status=0
  wait "$clip_pid" || clip_status=$?
  sam_status=0
  wait "$sam_pid" || sam_status=$?
  trap - INT TERM
  tr '\r' '\n' <"$sam_log" | tail -n 2  # its last words (the log also holds tqdm's carriage returns)
  for status in "$sam_status" "$clip_status"; do  # a failure first, then "stopped, state saved" (3)
    if [ "$status" != 0 ] && [ "$status" != 3 ]; then echo "error: a pretraining failed (SAM: exit $sam_status, see $sam_log; CLIP: exit $clip_status)" >&2; exit "$status"; fi
  done
  if [ "$sam_status" = 3 ] || [ "$clip_status" = 3 ]; then
    echo "pretraining stopped after $minutes minutes with its state saved: rerun this script to continue"; exit 3
  fi
else
  "$python" scripts/pretrain_sam.py --config-name "$sam_config" resume=true max_minutes="$minutes" &
  stage_pids=("$!")
  wait "$!"  # under set -e a failed or stopped (3) stage ends the script with its status
  "$python" scripts/pretrain_clip.py --config-name "$clip_config" resume=true max_minutes="$minutes" &
  stage_pids=("$!")
  wait "$!"
  trap - INT TERM
fi

# SSP-SAM training: resumed when runs/$run_name/last exists (a finished run then trains no epoch, and a
# run of other settings there is refused by name: move it away to train the current recipe), else started.
resume=false
if [ -d "runs/$run_name/last" ]; then resume=true; fi
trap 'stop_stages 130' INT
trap 'stop_stages 143' TERM
"$python" scripts/train.py experiment="$experiment" name="$run_name" train.max_minutes="$minutes" resume="$resume" "$@" &
stage_pids=("$!")
wait "$!"  # under set -e a failed or stopped (3) training ends the script with its status
trap - INT TERM

# Ship: the best epoch with its encoders stored in it (v2 runs name the committed encoder files and store
# only what trains, so their run directory is small enough to commit between sessions); the directory is
# replaced atomically, so a kill leaves the old or the new model.
"$python" scripts/embed_encoders.py checkpoint="runs/$run_name/best" out=checkpoints/shapeworld_default
echo "shipped: checkpoints/shapeworld_default"
