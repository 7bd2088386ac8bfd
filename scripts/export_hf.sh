#!/usr/bin/env bash
# Export a DCP checkpoint of a titan_geonorm run to a Hugging Face folder.
#
#   CONFIG_FILE=train_configs/debug_cpu.toml CHECKPOINT=outputs/debug_cpu/checkpoint/step-60 \
#       OUTPUT=outputs/hf ./scripts/export_hf.sh [--dtype bfloat16] [--section.key value ...]
#
# Extra arguments go to `python -m titan_geonorm.export` (its options, or the same
# `--section.key value` overrides the run was trained with). See docs/export.md.
set -euo pipefail

CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_cpu.toml"}
: "${CHECKPOINT:?set CHECKPOINT=<dump_folder>/checkpoint/step-N}"
: "${OUTPUT:?set OUTPUT=<folder to write>}"
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m titan_geonorm.export --config "$CONFIG_FILE" --checkpoint "$CHECKPOINT" \
    --output "$OUTPUT" "$@"
