#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install ssp_sam into it.
# Needs only Python 3.10+ and access to PyPI. Idempotent: a second run installs nothing new.
#   SSP_SAM_PYTHON   interpreter to build the venv with (default: python3.11, else python3)
#   SSP_SAM_VENV     where the venv goes (default: .venv in the repository)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SSP_SAM_VENV:-$repo/.venv}"
python="${SSP_SAM_PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv with $python"
    "$python" -m venv "$venv"
fi
stamp="$venv/.ssp_sam_installed"
wanted="$(cat "$repo/pyproject.toml" "$repo/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "[setup] installing torch, torchvision and ssp_sam (first run takes a few minutes)"
    # torch/torchvision pinned to a pair known to import together on CPU-only machines; any
    # CUDA-enabled torch >= 2.1 with its matching torchvision works as well.
    "$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    "$venv/bin/python" -m pip install --quiet -e "$repo[dev]"
    echo "$wanted" > "$stamp"
fi
