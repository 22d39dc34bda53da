# The README's two commands: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo demo-mini test test-fast bench bench-comm bench-checkpoint clean

$(VENV)/.installed: pyproject.toml launch/setup_env.sh
	VENV=$(VENV) bash launch/setup_env.sh

setup: $(VENV)/.installed

# The main job: 2-process FSDP2 training of the tiny LLaMA preset on the bundled text with Mano.
demo: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc-per-node 2 --standalone -m launch.train --config configs/llama_tiny.toml --resume none

# One process, one minute: the optimizer alone on a byte-level MLP.
demo-mini: $(VENV)/.installed
	$(PY) -m launch.demo

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) -m mano_dist.bench step

bench-comm: $(VENV)/.installed
	$(PY) -m mano_dist.bench comm

bench-checkpoint: $(VENV)/.installed
	$(PY) -m mano_dist.bench checkpoint

clean:
	rm -rf $(VENV) .pytest_cache runs
