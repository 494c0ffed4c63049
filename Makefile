# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install (torch 2.13.0 first), generate images from captions
#   make test   install the test extras too, run ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_RUN ?= runs/demo
DEMO_OUT ?= outputs/demo
DEMO_STEPS ?= 2500

.PHONY: demo test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Until the bundled pretrained model ships, the demo trains a small model for a few minutes
# (preset mnist-captions-small, $(DEMO_STEPS) steps) on the real MNIST digits, then draws.
demo: install
	$(BIN)/aligndraw data mnist
	@if [ ! -f $(DEMO_RUN)/last/config.json ]; then \
	  $(BIN)/aligndraw train --preset mnist-captions-small --out $(DEMO_RUN) \
	    --max-steps $(DEMO_STEPS); \
	fi
	$(BIN)/aligndraw generate --model $(DEMO_RUN) --num 4 --seed 0 --gif --out $(DEMO_OUT) \
	  "the digit 3 is on the left of the digit 5 ." \
	  "the digit 0 is at the top of the digit 4 ." \
	  "the digit 7 is at the bottom right of the image ." \
	  "the digit 8 is at the top left of the image ." \
	  "the digit 1 is at the top of the digit 6 ."
	@echo "images, grid, alignment pictures and GIFs are in $(DEMO_OUT)/"

lint: install
	$(BIN)/ruff check src tests benchmarks

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
