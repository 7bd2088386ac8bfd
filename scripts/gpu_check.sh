#!/usr/bin/env bash
# Set up a GPU machine for scripts/gpu_check.py, then run it (arguments are passed on).
#
#   bash scripts/gpu_check.sh [--deadline-s 450] [--parts train] ...
#
# With wheels in ./.whl (scripts/gpu_wheels.sh, for a machine without network such as the lent
# one) they are installed into /tmp/site without an index; otherwise the Python ($PYTHON, default
# python3) must already hold the dependencies (`pip install -e .`). The repo itself is put on
# PYTHONPATH: an editable install would need setuptools from an index on an offline machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# Versions first: with --no-deps nothing checked that the carried wheels fit the image's packages.
"$PY" - << 'PYEOF'
import importlib.metadata as md
names = ("torch", "triton", "torchtitan", "torchdata", "datasets", "pyarrow", "fsspec", "tokenizers", "tyro")
for name in names:
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
PYEOF
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" scripts/gpu_check.py "$@"
