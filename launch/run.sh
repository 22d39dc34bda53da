#!/usr/bin/env bash
# Launch launch.train with torchrun and c10d rendezvous, on one node or many.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 launch/run.sh --config configs/llama_1b.toml
#
# Run the same command on every node. Elastic restarts (MAX_RESTARTS, default 3) restart all
# workers after a failure; the trainer resumes from the newest complete checkpoint (--resume
# auto is its default), so a restarted job continues exactly where the last checkpoint left it.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
RDZV_ID=${RDZV_ID:-mano-${SLURM_JOB_ID:-${USER:-$(id -un)}}}  # USER is unset in some containers (set -u)
MAX_RESTARTS=${MAX_RESTARTS:-3}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
  --max-restarts "$MAX_RESTARTS" \
  -m launch.train "$@"
