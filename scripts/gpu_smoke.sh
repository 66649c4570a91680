#!/usr/bin/env bash
# The GPU paths in one command, for a machine with CUDA (CI and the developers' machines have none):
# for SSP-SAM and for SAM-MI (the tiny configurations), a two-step training with 2 processes (nccl;
# 1 process when only one GPU is visible, since nccl cannot put two ranks on one device) from the SAM
# embedding cache with a validation, an evaluation of its checkpoint, and every timing benchmark with
# --device cuda. Exits non-zero at the first failure; results go to $out (default gpu_smoke_out/).
#   bash scripts/gpu_smoke.sh [out_dir]
# SMOKE_DEVICE=cpu SMOKE_QUICK=1 runs the same commands on the CPU (gloo, benchmarks with --quick):
# that is how CI checks that the script itself works (tests/test_gpu_smoke.py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
python="${SSP_SAM_VENV:-$repo/.venv}/bin/python"
out="${1:-gpu_smoke_out}"

device="${SMOKE_DEVICE:-cuda}"
quick=()
[ "${SMOKE_QUICK:-0}" = 1 ] && quick=(--quick)
if [ "$device" = cuda ]; then
    gpus="$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
    if [ "$gpus" -lt 1 ]; then
        echo "gpu_smoke: no CUDA device visible (torch.cuda.is_available() is False); nothing to check" >&2
        exit 2
    fi
    procs=$(( gpus >= 2 ? 2 : 1 ))
else
    procs=2
fi
echo "[gpu_smoke] device $device; training with $procs process(es); outputs in $out/"
mkdir -p "$out"

step() { echo; echo "[gpu_smoke] $*"; }

step "data: a small ShapeWorld-Ref split"
"$python" scripts/make_shapeworld.py task=res out="$out/data" n_images='{train: 16, val: 4, test: 4}' seed=5

step "training: 2 steps, $procs process(es), device=$device"
"$python" -m torch.distributed.run --standalone --nproc_per_node="$procs" scripts/train.py \
    model=tiny dataset=shapeworld dataset.root="$out/data" \
    run_dir="$out/run" cache_dir="$out/cache" device="$device" \
    train.epochs=1 train.max_steps_per_epoch=2 train.batch_size=4 train.workers=2 \
    train.warmup_epochs=0 train.decoder_freeze_epochs=0 train.save_encoders=true val.split=val val.overlays=1

step "evaluation of the trained checkpoint on $device"
"$python" scripts/eval.py checkpoint="$out/run/best" dataset=shapeworld dataset.root="$out/data" \
    dataset.split=test device="$device" cache_dir="$out/cache" metrics_out="$out/results_test.json"

step "SAM-MI data: a small ShapeWorld-OVSS split"
"$python" scripts/make_shapeworld.py task=ovss out="$out/ovss_data" n_images='{train: 8, val: 4, test: 4}' seed=5

step "SAM-MI training: 2 iterations, $procs process(es), device=$device"
"$python" -m torch.distributed.run --standalone --nproc_per_node="$procs" scripts/train.py \
    experiment=ovss_tiny ovss_dataset=shapeworld_ovss ovss_dataset.root="$out/ovss_data" \
    'ovss_dataset.image_dir=shapeworld_ovss/images/${.split}' 'ovss_dataset.label_dir=shapeworld_ovss/annotations/${.split}' \
    ovss_dataset.classes=shapeworld_ovss/dataset.json run_dir="$out/ovss_run" cache_dir="$out/ovss_cache" device="$device" \
    train.iterations=2 train.batch_size=4 train.workers=2 train.crop=none train.save_every=2 train.save_encoders=true \
    train.precision=auto val.split=val val.every=2

step "SAM-MI evaluation of the trained checkpoint on $device"
"$python" scripts/eval.py checkpoint="$out/ovss_run/best" ovss_dataset=shapeworld_ovss ovss_dataset.root="$out/ovss_data" \
    ovss_dataset.split=test eval.sliding_window=false device="$device" cache_dir="$out/ovss_cache" \
    metrics_out="$out/ovss_results_test.json"

for bench in bench_train_step bench_eval_shared bench_shared_encoders bench_sam_encoder bench_ovss_tspp; do
    step "benchmark $bench --device $device ${quick[*]}"
    "$python" "benchmarks/$bench.py" --device "$device" "${quick[@]}" --out "$out/$bench.json"
done

echo
echo "[gpu_smoke] all checks passed on $device; results in $out/"
