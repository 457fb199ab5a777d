# Two commands do all set-up: `make run` and `make test` create .venv with the
# pinned dependencies (requirements.txt) the first time, then do their job.
PYTHON_BOOTSTRAP ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run test test-fast bench clean

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

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
