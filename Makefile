# Pufferfish: `make help` lists the targets.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# The CPU build that lies on disk here; on a CUDA machine an installed torch >= 2.4 is kept as it is.
TORCH_CPU ?= torch==2.13.0
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-full train dry-run sweep sweep-memory sweep-speed bench check-plans quality time-to-loss isoflop sweep-lr sweep-batch lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

install: ## install Pufferfish with its test extras (keeps an existing torch >= 2.4, else the CPU build)
	@$(PYTHON) -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 4) else 1)" 2>/dev/null \
		|| $(PIP) install "$(TORCH_CPU)"
	$(PIP) install -e ".[dev]"

test: ## the fast suite (a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -m "not slow and not gpu" -q

test-full: ## every test, slow end-to-end runs included
	$(PYTHON) -m pytest -q

train: ## train on the embedded default corpus, sized for this machine (ARGS="gpu=gtx1060 mode=standard")
	$(PYTHON) -m pufferfish.train $(ARGS)

dry-run: ## print the plan for ARGS without training
	$(PYTHON) -m pufferfish.train dry_run=true $(ARGS)

sweep: sweep-memory ## alias of sweep-memory

sweep-memory: ## memory tables: multirun under 6 GB emulation, max layers by bisection, .md + .png (SWEEP_DIR=, ARGS=)
	d="$(or $(SWEEP_DIR),multirun/memory_table/$$(date +%Y-%m-%d_%H-%M-%S))"; rc=0; \
	$(PYTHON) -m pufferfish.lab.measure -m experiment=memory_table hydra.sweep.dir="$$d" $(ARGS) || rc=$$?; \
	$(PYTHON) -m pufferfish.lab.memory_table "$$d" --search-max-layers && exit $$rc

sweep-speed: ## speed table: multirun on the real GPU, then .md + .png (SWEEP_DIR=, ARGS=)
	d="$(or $(SWEEP_DIR),multirun/speed_table/$$(date +%Y-%m-%d_%H-%M-%S))"; rc=0; \
	$(PYTHON) -m pufferfish.lab.measure -m experiment=speed_table hydra.sweep.dir="$$d" $(ARGS) || rc=$$?; \
	$(PYTHON) -m pufferfish.lab.speed_table "$$d" && exit $$rc

bench: ## throughput against transformers' Llama on this device (tiny shape on CPU)
	$(PYTHON) -m pufferfish.lab.bench_throughput $(ARGS)

check-plans: ## every gpu profile x mode plan, 20 steps under its memory cap: OOM? share of the cap used (GPU; ARGS=)
	$(PYTHON) -m pufferfish.lab.check_plans $(ARGS)

quality: ## handed-over loss per wall-clock budget: the plan, a multirun oracle, nanoGPT's recipe (GPU; ARGS="--out DIR ...")
	$(PYTHON) -m pufferfish.lab.quality_per_budget $(ARGS)

time-to-loss: ## seconds to a target validation loss: the default recipe, each candidate and nanoGPT at two sizes (GPU; ARGS="--out DIR --target 3.5 ...")
	$(PYTHON) -m pufferfish.lab.time_to_loss $(ARGS)

isoflop: ## tokens per parameter by optimizer: widths on one training compute (ARGS="--out DIR --flops 6e12 ...")
	$(PYTHON) -m pufferfish.lab.isoflop $(ARGS)

sweep-lr: ## learning rates of AdamW and Muon at two widths on the CPU, then their table (SWEEP_DIR=)
	d=$${SWEEP_DIR:-outputs/sweeps/optimizer_lr}; \
	$(PYTHON) -m pufferfish.train -m experiment=optimizer_lr optim.name=muon optim.muon_lr=0.01,0.02,0.04 hydra.sweep.dir="$$d/muon" && \
	$(PYTHON) -m pufferfish.train -m experiment=optimizer_lr optim.name=adamw optim.lr=1.5e-3,3e-3,6e-3 hydra.sweep.dir="$$d/adamw" && \
	$(PYTHON) -m pufferfish.compare "$$d" --sort loss

sweep-batch: ## AdamW and Muon at batches of 1,024 to 16,384 tokens on the same 0.8M tokens (CPU), then their table
	d=$${SWEEP_DIR:-outputs/sweeps/optimizer_batch}; \
	for bs in 1024:800 2048:400 4096:200 8192:100 16384:50; do b=$${bs%:*} s=$${bs#*:}; \
	  $(PYTHON) -m pufferfish.train -m experiment=optimizer_batch train.batch_tokens=$$b train.max_steps=$$s \
	    train.eval_interval=$$((s / 8)) hydra.sweep.dir="$$d/batch$$b" || exit 1; \
	done; \
	$(PYTHON) -m pufferfish.compare "$$d" --sort loss

lint: ## ruff
	$(PYTHON) -m ruff check pufferfish tests scripts

clean: ## remove run outputs and caches (not the tokenizer/token cache in ~/.cache/pufferfish)
	rm -rf outputs/* multirun .pytest_cache .ruff_cache .hypothesis
	touch outputs/.gitkeep
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
