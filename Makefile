# `make test` and `make bench` do all set-up on a fresh machine: a virtual environment in .venv,
# torch 2.14.1, the package with its dev extras, and the moe_kernels._C build (incremental).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moe-kernels-deps
TORCH  ?= torch==2.14.1
export MAX_JOBS ?= 2

.PHONY: all venv build test test-asan bench sweep gpu-check demo info lint sdist-check clean

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

# The CPU kernels built with AddressSanitizer + UBSan (a separate build, loaded through
# MOE_KERNELS_LIBRARY), then the op tests under them. Python itself leaks by design: leak
# detection off; every other ASan/UBSan report aborts the run.
ASAN_LIB := build/asan-lib
ASAN_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	MOE_KERNELS_LIBRARY="$$(ls $(ASAN_LIB)/moe_kernels/_C*.so)" MOE_KERNELS_BACKEND=cpu
# (libstdc++ is preloaded with the runtime: ASan's __cxa_throw interceptor needs it at start-up.)
test-asan: $(STAMP)
	MOE_KERNELS_SANITIZE=1 MOE_KERNELS_BUILD_CUDA=0 $(PY) setup.py -q build_ext --build-temp build/asan-temp --build-lib $(ASAN_LIB)
	$(ASAN_ENV) $(PY) -c "import moe_kernels._ext as e; i = e.build_info(); print('_C:', e.LIBRARY, i); assert 'asan' in i, e.LOAD_ERROR"
	$(ASAN_ENV) $(PY) -m pytest -q -p no:cacheprovider tests/test_topk_softmax.py tests/test_make_routing.py \
		tests/test_dispatch_combine.py tests/test_grouped_mm.py tests/test_ops.py tests/test_hardening.py \
		tests/test_layers.py tests/test_wgrad_avx512.py -k "not leak"

bench: build
	$(PY) -m bench

# Time per token over the token and expert sweeps (docs/sweep.md): out/sweep.json, docs/sweep.png.
sweep: build
	$(PY) -m bench.sweep

# The prepared GPU check (bench/gpu_check.py, docs/gpu-check.md). On a machine with a CUDA GPU it
# runs with that machine's own python3 (nothing installed) and builds _C in place for sm_90a;
# without one it is a dry run in .venv (make test runs that too). Results: $(GPU_CHECK_OUT).
GPU_CHECK_OUT ?= out/gpu
gpu-check:
	@if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		GPU_CHECK_COMMIT="$${GPU_CHECK_COMMIT:-$$(git rev-parse HEAD 2>/dev/null)}" \
			python3 -m bench.gpu_check --out "$(GPU_CHECK_OUT)"; \
	else \
		$(MAKE) --no-print-directory build && $(PY) -m bench.gpu_check --dry-run --out "$(GPU_CHECK_OUT)"; \
	fi

# Dense ViT vs V-MoE vs Mobile V-MoE on the embedded digits data (about 15 min on 2 cores).
demo: build
	$(PY) -m models.demo

lint: $(STAMP)
	$(PY) -m ruff check moe_kernels models bench tests examples setup.py .ci

# The user's path from source: build the sdist, build a wheel from it in a fresh virtual
# environment (torch first; CPU kernels only, MOE_KERNELS_BUILD_CUDA=0, to keep CI short), check
# what both carry, install the wheel and run `python -m moe_kernels.info` and one layer from a
# folder outside the checkout.
SDIST_VENV := build/sdist-venv
sdist-check: $(STAMP)
	rm -rf dist $(SDIST_VENV)
	MOE_KERNELS_BUILD_CUDA=0 $(PY) -m build -q --sdist --no-isolation --outdir dist .
	$(PYTHON) -m venv $(SDIST_VENV)
	$(SDIST_VENV)/bin/python -m pip install -q "$(TORCH)" setuptools wheel ninja
	MOE_KERNELS_BUILD_CUDA=0 $(SDIST_VENV)/bin/python -m pip wheel -q --no-build-isolation --no-deps -w dist dist/moe_kernels-*.tar.gz
	$(PY) .ci/check_dist.py dist
	$(SDIST_VENV)/bin/python -m pip install -q dist/moe_kernels-*.whl
	cd "$$(mktemp -d)" && $(CURDIR)/$(SDIST_VENV)/bin/python -m moe_kernels.info \
		&& $(CURDIR)/$(SDIST_VENV)/bin/python $(CURDIR)/.ci/sdist_smoke.py

clean:
	rm -rf build dist moe_kernels/_C*.so *.egg-info
