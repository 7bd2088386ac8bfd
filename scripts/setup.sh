#!/usr/bin/env bash
# Create ./.venv with titan-geonorm and its test dependencies (idempotent, no GPU needed).
# torch: CPU build 2.13.0 where there is no NVIDIA GPU (an unpinned torch pulls a multi-GB CUDA
# build); on a GPU machine any torch in the supported range >=2.11,<2.15.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install -q "torch>=2.11,<2.15"
    else
        "$PY" -m pip install -q "torch==2.13.0"
    fi
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import torch, torchtitan; print(f'setup: torch {torch.__version__}, torchtitan {torchtitan.__version__}')"
