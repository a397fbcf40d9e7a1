#!/usr/bin/env bash
# Create a virtual environment with dpft and every CPU-installable extra (robosuite, gymnasium MuJoCo,
# wandb, test tools). Usage: bash tools/setup_env.sh [VENV_DIR]   (default .venv)
# Python 3.8+ works; 3.11 is what CI uses. Override the torch build with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0"  (CPU wheel)   or install a CUDA torch into the venv first.
set -euo pipefail
VENV="${1:-.venv}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# torch first: an explicit version keeps pip from pulling a multi-GB CUDA build on CPU-only machines.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}" || "${PIP[@]}" install "torch>=2.0"
fi
"${PIP[@]}" install -c "$ROOT/constraints.txt" -e "$ROOT[all]"
# torchvision (pulled by nothing here) breaks diffusers beside the CPU torch wheel: make sure it is absent.
"${PIP[@]}" uninstall -y torchvision >/dev/null 2>&1 || true
echo "dpft installed in $VENV ($("$VENV/bin/python" -c 'import dpft; print(dpft.__version__)'))"
