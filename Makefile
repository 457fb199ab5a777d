# Two commands do all set-up: `make run` and `make test` create .venv with the
# pinned dependencies (requirements.txt) the first time, then do their job.
PYTHON_BOOTSTRAP ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run test test-fast bench gpu-check test-compat clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Main job: train BN and GNI on the embedded digits dataset and print both results.
run: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m shared.demo

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -n 2 --dist loadgroup -q tests

bench: $(STAMP)
	$(PY) -m bench

# One command that proves the project on a GPU (about 8 minutes on one H100), with the machine's own
# python (torch, torchvision, timm, pyyaml; no venv build, no wandb): `PYTHON=python3 make gpu-check`.
# CIFAR10: the ImageFolder archive (copy ../shared/data/cifar10-jpeg.tar.gz to data/, an ignored folder,
# so that it travels with the repository). Report: $$OUT (or output/gpu_check)/gpu_check.{md,json}.
CIFAR10 ?= data/cifar10-jpeg.tar.gz
gpu-check:
	$(or $(PYTHON),python3) -m bench.gpu_check --data $(CIFAR10)

# The oldest supported torch (requirements-compat.txt: torch 2.11, Python 3.12, no wandb) in its own
# venv: the whole suite, as `make test` runs it (the tests that need wandb skip there).
# the first python3.12 that runs (a pyenv shim answers `command -v` even where 3.12 is not selected)
COMPAT_PYTHON ?= $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) /usr/bin/python3.12; do "$$p" -c "" >/dev/null 2>&1 && { echo "$$p"; break; }; done)
COMPAT_VENV ?= build/compat-venv
COMPAT_STAMP := $(COMPAT_VENV)/.installed

# --no-cache-dir: pip's cache would keep a second copy of the 3 GB of CUDA wheels.
$(COMPAT_STAMP): requirements-compat.txt
	test -n "$(COMPAT_PYTHON)" || { echo "make test-compat needs python3.12 (or COMPAT_PYTHON=...)"; exit 2; }
	test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --no-cache-dir -r requirements-compat.txt
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	PYTHONPATH=$(CURDIR) WANDB_MODE=disabled $(COMPAT_VENV)/bin/python -m pytest -n 2 --dist loadgroup -q tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
