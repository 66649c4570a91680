#!/usr/bin/env bash
# Reproduce the shipped default model (checkpoints/shapeworld_default) from nothing, on a 2-core CPU.
#   bash scripts/train_default_model.sh
# Steps (seeds: data 7, encoder pretraining 1000, training 3407; the demo and the CI check use other seeds):
#   1. ShapeWorld-Ref GRES train/val data into data/shapeworld_train
#   2. pretrain the small SAM (promptable segmentation) and the small CLIP (region-caption contrast)
#   3. train SSP-SAM with both frozen (configs/experiment/shapeworld_default.yaml)
#   4. copy the best checkpoint (encoders embedded) to checkpoints/shapeworld_default
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
python="${SSP_SAM_VENV:-$repo/.venv}/bin/python"

"$python" scripts/make_shapeworld.py task=gres out=data/shapeworld_train n_images='{train: 3000, val: 100, test: 200}' seed=7
"$python" scripts/pretrain_sam.py
"$python" scripts/pretrain_clip.py
"$python" scripts/train.py experiment=shapeworld_default "$@"
rm -rf checkpoints/shapeworld_default
cp -r runs/shapeworld_default/best checkpoints/shapeworld_default
echo "shipped: checkpoints/shapeworld_default"
