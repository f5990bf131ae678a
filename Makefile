# crossaudit: every target creates .venv and installs pinned dependencies itself.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install demo test check docs bench corpus lint fmnist chromium clean

$(BIN)/crossaudit: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (crossaudit needs Python 3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/crossaudit

# Real Fashion-MNIST from Debian; stop with a clear message when it cannot be installed.
fmnist:
	@test -f $(FMNIST) || apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update >/dev/null 2>&1 && apt-get install -y dataset-fashion-mnist >/dev/null 2>&1) || \
	  { echo "error: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist'"; exit 2; }

# Debian's chromium for the MLflow UI test (tests/test_demo.py); without it that test skips its UI part, saying so.
chromium:
	@command -v chromium >/dev/null || apt-get install -y chromium >/dev/null 2>&1 || \
	  (apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1) || \
	  echo "warning: chromium could not be installed; the MLflow UI test will be skipped"

demo: install fmnist
	$(BIN)/python -m crossaudit.dev.demo $(DEMO_ARGS)

test: install fmnist chromium
	$(BIN)/pytest -q -n auto --maxschedchunk 1 --durations=25

# The fast tier: lint and every test not marked slow (nothing that trains a model zoo or
# runs a pipeline end to end), for the edit-test loop; `make test` runs everything.
check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n auto -m "not slow" --durations=10

# The documentation site (MkDocs, Material theme) under site/, strict: a broken link fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: install fmnist
	$(BIN)/python -m benchmarks.pipeline_overhead
	$(BIN)/python -m benchmarks.webhook_latency
	$(BIN)/python -m benchmarks.webhook_load
	$(BIN)/python -m benchmarks.detection $(DETECTION_ARGS)
	$(BIN)/python -m benchmarks.unseen_attacks
	$(BIN)/python -m benchmarks.model_sizes
	$(BIN)/python -m benchmarks.engineering
	$(BIN)/python -m benchmarks.paradigms

# The clean corpus (hours on 2 cores; models and findings are cached, so it can be built in
# parts: CORPUS_ARGS=--minutes 30 stops starting pairs after half an hour).
corpus: install fmnist
	$(BIN)/python -m benchmarks.clean_corpus --split test $(CORPUS_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-output .pytest_cache site
