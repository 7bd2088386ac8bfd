#!/usr/bin/env bash
# Launch titan_geonorm training with torchrun (torchtitan's run_train.sh conventions).
#
#   NGPU=2 CONFIG_FILE=train_configs/debug_cpu.toml ./scripts/run_train.sh [--section.key value ...]
#
# NGPU: processes per node (GPUs, or CPU ranks on a machine without GPUs).
# Multi-node: set NNODES, RDZV_ENDPOINT=host:port (same on every node) and optionally RDZV_ID;
# run the same command on every node (c10d rendezvous assigns node ranks).
# LOG_RANK: comma-separated ranks whose output is shown (default 0).
set -euo pipefail

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
LOG_RANK=${LOG_RANK:-0}
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_cpu.toml"}
TORCHRUN=${TORCHRUN:-torchrun}

if [ "$NNODES" -gt 1 ]; then
    : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the same on every node) for multi-node runs}"
    rdzv=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
          --rdzv-id "${RDZV_ID:-titan_geonorm}")
else
    rdzv=(--standalone)
fi

# Check the config in one plain process first: a bad key exits 2 with one line naming it, before
# torchrun starts (its agent reports any worker failure as a ChildFailedError and exits 1).
WORLD_SIZE=$((NNODES * NGPU)) "${PYTHON:-python}" -m titan_geonorm.train --preflight-only \
    --job.config_file "$CONFIG_FILE" "$@"

# After a torchrun restart (--max-restarts), workers sharing the agent's rendezvous store see the
# previous attempt's addresses and gloo fails with "connectFullMesh ... Connection refused"
# (pytorch/pytorch#135712); a per-attempt store avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-"expandable_segments:True"} \
exec "$TORCHRUN" --nproc-per-node "$NGPU" "${rdzv[@]}" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m titan_geonorm.train --job.config_file "$CONFIG_FILE" "$@"
