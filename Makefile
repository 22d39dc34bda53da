# The README's two commands: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo demo-mini test test-fast bench bench-step bench-kernels bench-comm bench-memory bench-e2e bench-ds bench-checkpoint bench-gpu compare plan clean

$(VENV)/.installed: pyproject.toml launch/setup_env.sh
	VENV=$(VENV) bash launch/setup_env.sh

setup: $(VENV)/.installed

# The main job: 2-process FSDP2 training of the tiny LLaMA preset on the bundled text with Mano.
demo: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc-per-node 2 --standalone -m launch.train --config configs/llama_tiny.toml --resume none --overwrite

# One process, one minute: the optimizer alone on a byte-level MLP.
demo-mini: $(VENV)/.installed
	$(PY) -m launch.demo

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q -m "not slow"

# Every benchmark figure in docs/benchmarks.md, each a ratio measured within one command;
# outputs also land in runs/bench/.
bench: bench-step bench-kernels bench-comm bench-memory bench-ds bench-e2e bench-checkpoint

bench-step: $(VENV)/.installed
	@mkdir -p runs/bench
	$(PY) -m mano_dist.bench step --model 1.3b --layers 4 | tee runs/bench/step_1.3b.txt
	$(PY) -m mano_dist.bench step --model 130m | tee runs/bench/step_130m.txt

# The kernels a GPU would run per step (inductor's Triton scheduling, no GPU needed): counts, not times.
bench-kernels: $(VENV)/.installed
	@mkdir -p runs/bench
	$(PY) -m mano_dist.bench kernels --model 1.3b | tee runs/bench/kernels_1.3b.txt

bench-memory: $(VENV)/.installed
	@mkdir -p runs/bench
	$(PY) -m mano_dist.bench memory | tee runs/bench/memory.txt

bench-e2e: $(VENV)/.installed
	@mkdir -p runs/bench
	$(PY) -m launch.measure.throughput | tee runs/bench/e2e.txt

bench-comm: $(VENV)/.installed
	@mkdir -p runs/bench
	$(PY) -m mano_dist.bench comm | tee runs/bench/comm.txt

bench-ds: $(VENV)/.installed
	@mkdir -p runs/bench
	$(PY) -m mano_dist.bench ds_comm | tee runs/bench/ds_comm.txt

bench-checkpoint: $(VENV)/.installed
	@mkdir -p runs/bench
	$(PY) -m mano_dist.bench checkpoint | tee runs/bench/checkpoint.txt

# On one CUDA device (not part of `make bench`: the project's machines have none): the trainer's
# real GPU memory against the dry run, step times with CUDA events, host syncs per step; under
# 10 minutes. Results in runs/bench/gpu/ (docs/benchmarks.md, "On a GPU").
bench-gpu: $(VENV)/.installed
	$(PY) -m mano_dist.bench gpu --out runs/bench/gpu

# The convergence study (about 30 minutes on 2 idle CPU cores): plots and table in runs/compare/.
compare: $(VENV)/.installed
	$(PY) -m launch.studies.compare --out runs/compare

# The token-scaling study (AdamW, Muon, Mano v2 and "both" at 0.3M, 1M, 3M tokens; about 2 h on 2
# cores): the runs recorded in docs/scaling_runs.jsonl count as done (when this checkout reproduces their
# starting point, see docs/benchmarks.md), finished runs are cached in runs/scaling/, plots and JSONL land in docs/.
.PHONY: scaling
scaling: $(VENV)/.installed
	$(PY) -m launch.studies.scaling --out runs/scaling --docs docs --records docs/scaling_runs.jsonl

plan: $(VENV)/.installed
	$(PY) -m launch.plan --config configs/llama_1b.toml --nodes 4 --gpus-per-node 8

clean:
	rm -rf $(VENV) .pytest_cache runs
