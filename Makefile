# Plain set-up: a local virtual environment with torch's CPU build installed first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install demo test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e ".[test,text]"  # no setuptools editable-install banner
	# LitGPT for the language-model tests, without its pins (huggingface-hub<1.4, jsonargparse<=4.41 clash with
	# transformers 5 and the CLI's jsonargparse): litgpt.model and litgpt.config need nothing more
	$(BIN)/python -m pip install --quiet --no-deps litgpt==0.5.13
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default (scikit-learn's digits): fit + index, then influence + reports.
# CPU threads need no setting: the CLI's --threads defaults to the cores not already busy (at most 4).
demo: install
	$(BIN)/lightning-fastif fit -c configs/digits.yaml -c configs/digits_fit.yaml
	$(BIN)/lightning-fastif influence -c configs/digits.yaml -c configs/digits_influence.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs .pytest_cache
