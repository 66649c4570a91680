#!/usr/bin/env bash
# Install (if needed) and run the test suite:  bash scripts/run_tests.sh [pytest args]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "${SSP_SAM_VENV:-$repo/.venv}/bin/python" -m pytest -n 2 --durations=15 "$@"
