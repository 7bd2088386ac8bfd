#!/usr/bin/env bash
# Download, into ./.whl, the wheels the lent GPU machine lacks for scripts/gpu_check.sh.
#
#   bash scripts/gpu_wheels.sh        # here, with network; then carry ".whl" in the device run
#
# That machine has no network; its Python 3.12 image already holds torch, triton, tokenizers,
# tensorboard, safetensors, transformers, huggingface-hub, pyarrow, pandas, fsspec, xxhash and
# the rest (/work/.library/device/KINDS.md). Missing there: torchtitan and what it and the
# plugin import at run time. tomli is not needed on 3.12 (torchtitan falls back to tomllib).
# Versions are the ones this repo's venv is tested with; one version of each, or the install
# there stops. The carried working tree is limited to 64 MiB: this set is 1.7 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHEELS=(
    torchtitan==0.2.2
    torchdata==0.11.0
    tyro==1.0.17
    docstring-parser==0.18.0
    typeguard==4.6.1
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
# Other wheels may share the folder; two versions of one package make the install there stop.
dups=$(for f in .whl/*.whl; do basename "$f" | cut -d- -f1; done | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "gpu_wheels.sh: several versions in .whl of: $dups; keep one of each" >&2
    exit 1
fi
