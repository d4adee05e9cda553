# Two entry points for a fresh machine: `make run` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
JOB    ?= jobs/quickstart.yaml
# torch comes through pip (see below); everything else through uv, which installs the same versions in
# a quarter of pip's time (28 s instead of 100 s here). Both byte-compile what they install, and that is
# kept: where PYTHONDONTWRITEBYTECODE is set (it is here) nothing compiled later is kept, and every
# process that imports torch, Ray and MLflow would compile them again (6 s instead of 2).
PIP    := $(BIN)/pip install -q
UV     := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned, so that no dependency pulls a multi-GB CUDA build here.
# A venv that already has a torch (a user's GPU build) keeps it.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	touch $@

$(BIN)/uv: | $(BIN)/python
	$(PIP) uv

$(VENV)/.core: pyproject.toml $(VENV)/.torch | $(BIN)/uv
	$(UV) -e .
	touch $@

# One resolve for the package and its test extras.
$(VENV)/.test: pyproject.toml $(VENV)/.torch | $(BIN)/uv
	$(UV) -e ".[test,bench]"
	touch $(VENV)/.core $@

run: $(VENV)/.core
	@test -f data/synth-debug/manifest.parquet || \
		$(BIN)/metadist data synth data/synth-debug --per-class 40 --size 32 --shard-mb 0.3 --workers 2
	$(BIN)/metadist train $(JOB)

# One pytest worker per core: the tests that use Ray run in one of them, in order, the rest beside them.
test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n auto --dist loadgroup tests

bench: $(VENV)/.test
	$(BIN)/python bench/inner_loop.py
	$(BIN)/python bench/reducer.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
