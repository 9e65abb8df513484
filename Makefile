# `make test` and `make demo` work on a fresh machine with only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench bench-real easyvqa easyvqa-ablation scenes-quick scenes-ablation clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls multi-GB CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# test-only oracle for the VQA metric (lavis/common/vqa_tools/vqa_eval.py, loaded by path); its pins are not ours
	$(BIN)/python -m pip install -q --no-deps salesforce-lavis==1.0.2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks recipes

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/instructblip ask examples/easyvqa-test-0.png "What color is the shape?"
	$(BIN)/instructblip ask examples/easyvqa-test-0.png "What shape is in the image?"
	$(BIN)/instructblip ask examples/easyvqa-test-0.png "Is there a blue shape?"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --write benchmarks/RESULTS.md

# Vicuna-7B and Flan-T5-XL at their real shapes, random weights (24 GB written once under ~/.cache/instructblip-bench);
# about an hour on 2 cores, wants ~20 GB free memory and a quiet machine; not part of `make test`
bench-real: $(STAMP)
	$(BIN)/python benchmarks/bench_real.py --write benchmarks/RESULTS.md

# the default model: trains the small InstructBLIP on easy-vqa (about 29 minutes on 2 cores) and installs it into
# src/instructblip/default_model/ (docs/easyvqa.md records the result's sha256)
easyvqa: $(STAMP)
	$(BIN)/python recipes/easyvqa/run.py --install

# the paper's ablation in miniature (docs/easyvqa.md): about 35-40 minutes on 2 cores after `make easyvqa` (whose
# stages 0, 0b and 1 it reuses), about an hour without
easyvqa-ablation: $(STAMP)
	$(BIN)/python recipes/easyvqa/ablation.py --eval-limit 1000 $$(test -f runs/easyvqa/summary.json && echo --base runs/easyvqa)

# the instruction-aware Q-Former's ablation on scenes where the question decides what must be seen
# (docs/instruction-ablation.md): the quick check, (a) against (b) at 2 query tokens, one seed, last line `gap: X.X points`
scenes-quick: $(STAMP)
	$(BIN)/python recipes/scenes/ablation.py --quick

# every run, query count and seed (see docs/instruction-ablation.md for its cost); a rerun skips the cells done
scenes-ablation: $(STAMP)
	$(BIN)/python recipes/scenes/ablation.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
