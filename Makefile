# Setup installs the CPU build of torch on machines without a GPU (the pinned wheel is on local
# disk here); on a GPU machine run `make setup TORCH=torch` or install your CUDA build first.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: setup demo test clean gpu-wheels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,mlflow]"
	touch $@

demo: setup
	$(BIN)/python -m dist_lc demo

# Tests that need the real sample (DIST_LC_SHARED, default ../shared) or a Slurm cluster skip without
# them; DIST_LC_REQUIRE_SAMPLE=1 / DIST_LC_REQUIRE_SLURM=1 (set by .ci/run) make that a failure.
test: setup
	$(BIN)/python -m pytest -q --durations=20

# The packages that a lent GPU machine's image lacks (benchmarks/gpu_device.sh), at this venv's
# versions, as wheels for its Python 3.12 in .whl/ (git-ignored; carry it along).
GPU_WHEELS = webdataset braceexpand submitit lightgbm
gpu-wheels: setup
	rm -rf .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl $$($(BIN)/pip freeze | grep -iE '^($(subst $(eval) ,|,$(GPU_WHEELS)))==')

clean:
	rm -rf $(VENV) demo_out .whl
