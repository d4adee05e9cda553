# Two entry points for a fresh machine: `make run` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
JOB    ?= jobs/quickstart.yaml

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned, so that no dependency pulls a multi-GB CUDA build here.
# A venv that already has a torch (a user's GPU build) keeps it.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	touch $@

$(VENV)/.core: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.core
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $@

run: $(VENV)/.core
	@test -f data/synth-debug/manifest.parquet || \
		$(BIN)/metadist data synth data/synth-debug --per-class 40 --size 32 --shard-mb 0.3 --workers 2
	$(BIN)/metadist train $(JOB)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.test
	$(BIN)/python bench/inner_loop.py
	$(BIN)/python bench/ray_overhead.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
