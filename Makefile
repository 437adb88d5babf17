# Two commands for a fresh machine: `make demo` and `make test`. Both run `make setup` first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.recdistill-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup test test-fast demo clean fashion-mnist

setup: $(STAMP) fashion-mnist

# Reinstalls only when a lock file or pyproject changes, so a second `make setup` is instant.
$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -r requirements-nodeps.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The vision jobs read Fashion-MNIST from a Debian package: installed when we are root, a hint otherwise.
fashion-mnist:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; } \
		|| echo "note: could not install dataset-fashion-mnist; the vision jobs need it"; \
	else \
		echo "note: Fashion-MNIST is not in $(FASHION_MNIST); the vision jobs need it: sudo apt-get install dataset-fashion-mnist"; \
	fi

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/recdistill demo

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
