# Set-up and the two commands the README promises. `make demo` / `make test` on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; on a GPU machine install your CUDA torch into the venv first (make TORCH=).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/pip install --quiet "$(TORCH)")
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: setup  ## the main job: a LoRA rank sweep on the embedded model, local Ray, MLflow in ./mlflow.db
	$(BIN)/python -m orchestrator +sweep=lora_rank

test: setup  ## every test, the end-to-end Ray ones included
	$(BIN)/python -m pytest -q

test-fast: setup  ## unit tests only (no Ray)
	$(BIN)/python -m pytest -q -m "not ray"

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
