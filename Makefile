# Both targets bootstrap everything on a fresh machine and are idempotent.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export OMP_NUM_THREADS ?= 2

.PHONY: demo test setup data lint clean

setup: $(STAMP) data

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: it is the CPU build on this disk; a bare `torch` requirement would pull a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray,imagenet]'
	touch $(STAMP)

data:
	@if [ -f "$(DATA)" ] || [ -n "$$PARAMTRANSFER_DATA" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or set PARAMTRANSFER_DATA"; exit 1; \
	fi

demo: setup
	$(BIN)/paramtransfer demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
