#!/usr/bin/env bash
# Launch launch.train with torchrun and c10d rendezvous, on one node or many.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 launch/run.sh --config configs/llama_1b.toml
#
# Run the same command on every node. Elastic restarts (MAX_RESTARTS, default 3) restart all
# workers after a failure; the trainer resumes from the newest complete checkpoint (--resume
# auto is its default), so a restarted job continues exactly where the last checkpoint left it.
#
# Preemption (launch/trainer/preemption.py): SIGTERM or SIGUSR1 to this script is forwarded, once, to
# torchrun, whose agent forwards it to the workers; they stop at the next step boundary with a
# complete checkpoint. torchrun then exits 1 (it passes no worker's exit code through), so the
# workers also write a marker file (MANO_PREEMPTED_FILE, a fresh name per launch) and this script
# exits 75 when the marker is there: launch/slurm.sbatch requeues the job on 75. The agent waits
# SHUTDOWN_TIMEOUT seconds (default 100) for the workers to finish that checkpoint before it
# SIGKILLs them; keep it below the grace period the scheduler gives (slurm.sbatch: 120 s).
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
PREEMPTED_EXIT_CODE=75  # launch/trainer/preemption.py PREEMPTED_EXIT_CODE
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}
# torchrun's agent handles (forwards) these; SIGUSR1 is not among its defaults (older torch: ignored)
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
marker=$(mktemp "${TMPDIR:-/tmp}/mano-preempted.XXXXXX")
rm -f "$marker"
export MANO_PREEMPTED_FILE=$marker

child=
forwarded=
forward() {  # once: SLURM may signal torchrun directly too, and its wait for the workers survives one repeat
  [ -n "$forwarded" ] && return 0
  forwarded=$1
  if [ -n "$child" ]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT  # Ctrl-C: this script waits for torchrun's shutdown instead of leaving first
"$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
  --max-restarts "$MAX_RESTARTS" \
  -m launch.train "$@" &
child=$!
if [ -n "$forwarded" ]; then kill -s "$forwarded" "$child" 2>/dev/null || true; fi  # signalled while starting it
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for torchrun itself
  status=0
  wait "$child" || status=$?
done
if [ -e "$marker" ] && [ "$status" -ne 0 ]; then
  echo "launch/run.sh: $(cat "$marker"); exit code $PREEMPTED_EXIT_CODE" >&2
  rm -f "$marker"
  exit "$PREEMPTED_EXIT_CODE"
fi
rm -f "$marker"
exit "$status"
