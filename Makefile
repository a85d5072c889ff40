# Two commands from a fresh clone: `make demo` and `make test`.
# Both create (or refresh) .venv and install the project into it first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch 2.13.0: on this project's CI machines a CPU wheel of it lies on local disk
# (seconds to install); on a GPU machine pip gets the regular CUDA build of the same
# version. An already installed torch (any build) is kept. Override: make TORCH_SPEC=...
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The HTML report test drives a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); \
	  else echo "chromium not found: install it (Debian: apt-get install chromium) for the report test"; fi; }

demo: $(STAMP)
	$(BIN)/arrakis-ray demo --store demo_store

test: $(STAMP) browser
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf demo_store .pytest_cache
