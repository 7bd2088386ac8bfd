#!/usr/bin/env bash
# The main job: set up ./.venv, then train the `tiny` model for a short run on the embedded corpus
# (the Python standard library's docstrings; no download, no data files). Extra args override the
# config, e.g. `bash scripts/quickstart.sh --training.steps 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PATH="$PWD/.venv/bin:$PATH" NGPU=${NGPU:-1} CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_cpu.toml} \
    exec bash scripts/run_train.sh "$@"
