# The README's two commands: `make run` and `make test`.  Both set up a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CUDA machine can pass its own build, e.g. TORCH_SPEC='torch>=2.2'
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test lint redis-server chromium bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# Serve the models in models/ (the shipped demo-brain-mri) on the embedded in-process queue (no
# Redis needed).  When models/ holds none, an untrained 256^3 HA-GAN (width 0.25, latent 128) is
# initialised there first, and the service says so in GET /models (its description).
DEFAULT_MODEL := models/hagan-256-untrained
run: setup
	@ls models/*/config.json >/dev/null 2>&1 || $(BIN)/voxgen init --family hagan --resolution 256 --width 0.25 \
	  --latent-dim 128 --modality ct --seed 0 -o $(DEFAULT_MODEL)
	$(BIN)/voxgen serve --host $(HOST) --port $(PORT)

# The whole test suite; integration tests start their own redis-server and Celery worker.  It runs in
# TEST_WORKERS pytest-xdist processes, the cores shared among them (tests/conftest.py): much of the
# suite waits on process starts, imports and HTTP, so two workers on 2 cores take about 0.7x the time
# of one (benchmarks/RESULTS.md).  TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
test: setup redis-server chromium
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: setup
	$(BIN)/ruff check .

# Integration tests need the redis-server binary (they start their own server on a free port).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found; installing it (Debian/Ubuntu)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }

# The viewer's end-to-end tests drive Debian's Chromium with Playwright (no browser download).
chromium:
	@test -x /usr/bin/chromium || { echo "chromium not found; installing it (Debian/Ubuntu)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

bench: setup
	$(BIN)/python benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
