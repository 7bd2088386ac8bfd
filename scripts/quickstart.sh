#!/usr/bin/env bash
# The main job: set up ./.venv, train the plugin's flagship combination (train_configs/debug_cpu.toml)
# on the embedded corpus (the Python standard library's docstrings; no download, no data files),
# export the newest checkpoint to a Hugging Face folder, load it with transformers, and print a
# greedy continuation plus a summary. A second run resumes (or finds the run done) and reports
# again. Extra args override the config, e.g. `bash scripts/quickstart.sh --model.name llama3_titan
# --optimizer.name AdamW --job.dump_folder outputs/stock` for stock torchtitan llama3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_cpu.toml}
NGPU=${NGPU:-1} CONFIG_FILE=$CONFIG_FILE bash scripts/run_train.sh "$@"
python scripts/quickstart_report.py --config "$CONFIG_FILE" -- "$@"
