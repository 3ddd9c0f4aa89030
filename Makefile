# Setup installs the CPU build of torch on machines without a GPU (the pinned wheel is on local
# disk here); on a GPU machine run `make setup TORCH=torch` or install your CUDA build first.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: setup demo test clean
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

clean:
	rm -rf $(VENV) demo_out
