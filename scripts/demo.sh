#!/usr/bin/env bash
# The README's first command: install (if needed), then the demo on the shipped ShapeWorld model.
#   bash scripts/demo.sh [--out demo_out] [--n-images 40] [--device auto]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "${SSP_SAM_VENV:-$repo/.venv}/bin/python" scripts/demo.py "$@"
