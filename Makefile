# Set-up and entry points. Everything a fresh machine needs is installed from here.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, pinned, so pip takes the CPU build on this machine's disk rather
# than a multi-GB CUDA build; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
OUT ?= out
BIN := $(VENV)/bin

.PHONY: install browser demo test lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/farm render jobs/demo.yaml --out $(OUT)
	@echo "images: $$(ls $(OUT)/demo/images/*.png | wc -l) in $(OUT)/demo/images"

# tests/test_report.py opens the HTML gallery in headless Chromium (Debian's package), so
# `make test` installs it when it is missing; sudo only where we are not root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

browser:
	@command -v chromium >/dev/null || { \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: install browser
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/grid_throughput.py
	$(BIN)/python benchmarks/driver_ceiling.py
	$(BIN)/python benchmarks/first_image.py
	$(BIN)/python benchmarks/steering_cost.py
	$(BIN)/python benchmarks/families.py
	$(BIN)/python benchmarks/animation.py
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(OUT) .pytest_cache
