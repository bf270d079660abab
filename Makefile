# `make test` and `make bench` do all set-up on a fresh machine: a virtual environment in .venv,
# torch 2.14.1, the package with its dev extras, and the moe_kernels._C build (incremental).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moe-kernels-deps
TORCH  ?= torch==2.14.1
export MAX_JOBS ?= 2

.PHONY: all venv build test bench demo info lint clean

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH)"
	MOE_KERNELS_SKIP_BUILD=1 $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

venv: $(STAMP)

# ninja keeps build/ between runs, so this only recompiles what changed.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

info: build
	$(PY) -m moe_kernels.info

test: build
	$(PY) -m moe_kernels.info
	$(PY) -m pytest -q --benchmark-disable

bench: build
	$(PY) -m bench

lint: $(STAMP)
	$(PY) -m ruff check moe_kernels models bench tests

clean:
	rm -rf build moe_kernels/_C*.so *.egg-info
