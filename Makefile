# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install (torch 2.13.0 first), generate images from captions
#   make test   install the test extras too, run ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= outputs/demo

.PHONY: demo test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Draws from the bundled pretrained model (no MNIST, no training): a captioned sheet that
# includes held-out compositions (never seen in training), per-image PNGs, an alignment picture
# per caption and a GIF of each caption's canvas being drawn.
demo: install
	$(BIN)/aligndraw generate --model mnist-captions --num 4 --seed 0 --gif --out $(DEMO_OUT) \
	  "the digit 3 is on the left of the digit 5 ." \
	  "the digit 0 is at the top of the digit 4 ." \
	  "the digit 6 is at the bottom right of the image ." \
	  "the digit 8 is at the top left of the image ." \
	  "the digit 1 is at the top of the digit 6 ." \
	  "the digit 7 is at the bottom right of the image ."
	@echo "make demo: the sheet is $(DEMO_OUT)/grid.png; GIFs and alignment pictures beside it"

lint: install
	$(BIN)/ruff check src tests benchmarks

# The suite runs in TEST_WORKERS processes (pytest-xdist's worksteal: each worker starts on its
# share of the tests and, when its queue runs low, takes half of another's). TEST_WORKERS=0 runs
# it in this one process.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
