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

.PHONY: setup setup-gpu test test-fast demo clean fashion-mnist

setup: $(STAMP) fashion-mnist

# Reinstalls only when a lock file or pyproject changes, so a second `make setup` is instant.
$(STAMP): requirements.lock requirements-nodeps.lock requirements-extras.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -r requirements-nodeps.lock
	$(PIP) install -q -r requirements-extras.lock
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

# GPU machines (UNTESTED: no session has had a GPU yet; docs/results/scale.md): a separate venv
# with PyPI's CUDA build of torch, the CUDA fbgemm-gpu and torchrec; the sharded job then runs
# on NCCL (sharding.backend auto). Not part of `make test`.
GPU_VENV := .venv-gpu
setup-gpu:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q torch==2.13.0 fbgemm-gpu==1.8.0 torchrec==1.8.0
	grep -v -E '^(torch|fbgemm-gpu-cpu)==' requirements.lock | $(GPU_VENV)/bin/pip install -q -r /dev/stdin
	grep -v '^torchrec==' requirements-nodeps.lock | $(GPU_VENV)/bin/pip install -q --no-deps -r /dev/stdin
	$(GPU_VENV)/bin/pip install -q -r requirements-extras.lock
	$(GPU_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(GPU_VENV)/bin/python -c "import torch, fbgemm_gpu, torchrec; print('cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'gpus')"

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
